//! How a Service's new flows pick a backend: the algorithm, chosen per
//! Service by annotation over a node-wide default, and Maglev's table size.

use std::{fmt, str::FromStr};

use crate::kinds::Service;
use serde::Serialize;

use crate::maglev;

/// Annotation naming the algorithm (values as `Algorithm`'s names).
pub const ALGORITHM_ANNOTATION: &str = "xdproxy.io/lb-algorithm";
/// Annotation with the Maglev (and source hash) table size: a prime.
pub const TABLE_SIZE_ANNOTATION: &str = "xdproxy.io/maglev-table-size";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Uniformly at random per new flow, as kube-proxy.
    #[default]
    Random,
    RoundRobin,
    LeastConnections,
    /// Maglev consistent hashing of the 5-tuple: the same backend on every
    /// node, and few flows move when backends come and go.
    Maglev,
    /// Maglev consistent hashing of the client address only.
    SourceHash,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Random,
        Algorithm::RoundRobin,
        Algorithm::LeastConnections,
        Algorithm::Maglev,
        Algorithm::SourceHash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
            Algorithm::LeastConnections => "least-connections",
            Algorithm::Maglev => "maglev",
            Algorithm::SourceHash => "source-hash",
        }
    }

    /// True if its slots hold a Maglev lookup table.
    pub fn uses_table(self) -> bool {
        matches!(self, Algorithm::Maglev | Algorithm::SourceHash)
    }

    /// The datapath's `ALG_*` number.
    pub fn number(self) -> u32 {
        match self {
            Algorithm::Random => proxy_common::ALG_RANDOM,
            Algorithm::RoundRobin => proxy_common::ALG_ROUND_ROBIN,
            Algorithm::LeastConnections => proxy_common::ALG_LEAST_CONN,
            Algorithm::Maglev => proxy_common::ALG_MAGLEV,
            Algorithm::SourceHash => proxy_common::ALG_SOURCE_HASH,
        }
    }

    /// The algorithm with the datapath's `ALG_*` number `n`, if any.
    pub fn from_number(n: u32) -> Option<Algorithm> {
        [
            Algorithm::Random,
            Algorithm::RoundRobin,
            Algorithm::LeastConnections,
            Algorithm::Maglev,
            Algorithm::SourceHash,
        ]
        .into_iter()
        .find(|a| a.number() == n)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                format!("{s:?} is not one of {}", names.join(", "))
            })
    }
}

/// A Service's balancing, or the node's default for Services that do not
/// say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Balancing {
    pub algorithm: Algorithm,
    pub table_size: u32,
}

impl Default for Balancing {
    fn default() -> Self {
        Balancing {
            algorithm: Algorithm::Random,
            table_size: maglev::DEFAULT_TABLE_SIZE,
        }
    }
}

/// A table size given on the command line or in an annotation.
pub fn parse_table_size(s: &str) -> Result<u32, String> {
    let size: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    maglev::check_table_size(size)?;
    Ok(size)
}

/// The Service's balancing: its annotations over `default`. Err names the
/// annotation that is wrong and why.
pub fn of_service(service: &Service, default: Balancing) -> Result<Balancing, (String, String)> {
    let annotations = service.metadata.annotations.as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key));
    let field = |key: &str| format!("metadata.annotations[{key:?}]");
    let algorithm = match get(ALGORITHM_ANNOTATION) {
        Some(value) => value
            .parse()
            .map_err(|e| (field(ALGORITHM_ANNOTATION), e))?,
        None => default.algorithm,
    };
    let table_size = match get(TABLE_SIZE_ANNOTATION) {
        Some(value) => parse_table_size(value).map_err(|e| (field(TABLE_SIZE_ANNOTATION), e))?,
        None => default.table_size,
    };
    Ok(Balancing {
        algorithm,
        table_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Meta;

    fn annotated(pairs: &[(&str, &str)]) -> Service {
        Service {
            metadata: Meta {
                annotations: Some(
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Meta::default()
            },
            ..Service::default()
        }
    }

    #[test]
    fn annotations_override_the_default_and_bad_ones_are_named() {
        let default = Balancing {
            algorithm: Algorithm::RoundRobin,
            table_size: 251,
        };
        assert_eq!(of_service(&annotated(&[]), default), Ok(default));
        let maglev = annotated(&[
            (ALGORITHM_ANNOTATION, "maglev"),
            (TABLE_SIZE_ANNOTATION, "65537"),
        ]);
        assert_eq!(
            of_service(&maglev, default),
            Ok(Balancing {
                algorithm: Algorithm::Maglev,
                table_size: 65537
            })
        );
        for name in Algorithm::ALL.map(Algorithm::name) {
            let service = annotated(&[(ALGORITHM_ANNOTATION, name)]);
            assert_eq!(
                of_service(&service, default).map(|b| b.algorithm.name()),
                Ok(name)
            );
        }
        let bad = of_service(&annotated(&[(ALGORITHM_ANNOTATION, "fastest")]), default);
        assert!(
            matches!(bad, Err((f, m)) if f.contains(ALGORITHM_ANNOTATION) && m.contains("maglev"))
        );
        let not_prime = of_service(&annotated(&[(TABLE_SIZE_ANNOTATION, "16384")]), default);
        assert!(matches!(not_prime, Err((f, _)) if f.contains(TABLE_SIZE_ANNOTATION)));
    }
}

/// `--lb-algorithm` and `--maglev-table-size`, shared by `run` and `plan`.
#[derive(clap::Args, Clone, Copy, Debug)]
#[group(id = "balancing")]
pub struct Flags {
    /// How Services pick a backend for a new flow unless their
    /// `xdproxy.io/lb-algorithm` annotation says: random, round-robin,
    /// least-connections, maglev or source-hash.
    #[arg(long = "lb-algorithm", default_value = "random", value_parser = Algorithm::from_str)]
    pub algorithm: Algorithm,
    /// Maglev (and source hash) table size, a prime, unless a Service's
    /// `xdproxy.io/maglev-table-size` annotation says.
    #[arg(long = "maglev-table-size", default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = parse_table_size)]
    pub table_size: u32,
    /// Most lb_slots entries one Service's slot tables may take (frontends
    /// with the same backends share a table: a Maglev table costs its size
    /// once per distinct backend set). A Service over it is invalid and
    /// keeps its last valid version. Default: a sixteenth of lb_slots.
    #[arg(long = "slot-budget", default_value_t = crate::budget::DEFAULT_SLOT_BUDGET)]
    pub slot_budget: u32,
}

impl Flags {
    pub fn balancing(self) -> Balancing {
        Balancing {
            algorithm: self.algorithm,
            table_size: self.table_size,
        }
    }
}
