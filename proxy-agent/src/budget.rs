//! The per-Service slot budget: how many `lb_slots` entries the slot tables
//! of one Service may take. Frontends whose slots would be equal share one
//! table, so a Service costs one table per distinct backend set (a port,
//! and under externalTrafficPolicy: Local its node-local set too), not one
//! per frontend. Without a budget one Service (a 131071-entry Maglev table
//! on many ports) could take the whole map from every other Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
};

use proxy_common::MAX_SLOTS;

use crate::model::{Frontend, FrontendState, ObjectKey, Protocol};

/// Default budget: a sixteenth of `lb_slots` (262144 entries), room for
/// two tables of the largest Maglev size (131071) or sixteen of the
/// default size (16381), so sixteen Services at their budget still leave
/// the map room to replace each table before the old one goes.
pub const DEFAULT_SLOT_BUDGET: u32 = MAX_SLOTS / 16;

/// What a slot table's content depends on: the same key, the same table.
type Shape<'a> = (Protocol, u32, &'a [SocketAddr]);

/// The slots a frontend's table has: the Maglev table with backends, else
/// one per backend.
pub fn table_len(state: &FrontendState) -> u32 {
    if state.algorithm.uses_table() && !state.backends.is_empty() {
        state.table_size
    } else {
        state.backends.len() as u32
    }
}

/// The `lb_slots` entries these frontends need, each distinct table once.
pub fn slots_needed<'a>(
    frontends: impl IntoIterator<Item = (&'a Frontend, &'a FrontendState)>,
) -> u64 {
    let mut seen: BTreeSet<Shape> = BTreeSet::new();
    let mut total = 0;
    for (frontend, state) in frontends {
        let size = match state.algorithm.uses_table() {
            true => state.table_size,
            false => 0,
        };
        if seen.insert((frontend.protocol, size, &state.backends)) {
            total += u64::from(table_len(state));
        }
    }
    total
}

/// A Service whose tables need more than the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverBudget {
    pub service: ObjectKey,
    pub needed: u64,
    pub budget: u32,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {}: its slot tables need {} lb_slots entries, more than the per-Service \
             budget of {} (--slot-budget); a smaller xdproxy.io/maglev-table-size or fewer \
             ports fit; kept its last valid version",
            self.service, self.needed, self.budget
        )
    }
}

/// Err if the frontends one Service wants need more than `budget`.
pub fn check(
    service: &ObjectKey,
    wanted: &[(Frontend, FrontendState)],
    budget: u32,
) -> Result<(), OverBudget> {
    let needed = slots_needed(wanted.iter().map(|(f, s)| (f, s)));
    if needed <= u64::from(budget) {
        return Ok(());
    }
    Err(OverBudget {
        service: service.clone(),
        needed,
        budget,
    })
}

/// Every Service of a desired state over the budget.
pub fn over_budget(frontends: &BTreeMap<Frontend, FrontendState>, budget: u32) -> Vec<OverBudget> {
    let mut by_service: BTreeMap<&ObjectKey, Vec<(&Frontend, &FrontendState)>> = BTreeMap::new();
    for (frontend, state) in frontends {
        by_service
            .entry(&state.service)
            .or_default()
            .push((frontend, state));
    }
    by_service
        .into_iter()
        .filter_map(|(service, list)| {
            let needed = slots_needed(list);
            (needed > u64::from(budget)).then(|| OverBudget {
                service: service.clone(),
                needed,
                budget,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        balancing::Algorithm,
        model::{Clients, Scope},
    };

    fn frontend(last: u8, port: u16) -> Frontend {
        Frontend {
            addr: [203, 0, 113, last].into(),
            port,
            protocol: Protocol::Tcp,
            clients: Clients::All,
        }
    }

    fn maglev(size: u32, backends: &[&str]) -> FrontendState {
        FrontendState {
            service: ObjectKey {
                namespace: "demo".into(),
                name: "big".into(),
            },
            scope: Scope::ExternalIp,
            backends: backends.iter().map(|b| b.parse().expect("addr")).collect(),
            algorithm: Algorithm::Maglev,
            table_size: size,
            ..FrontendState::default()
        }
    }

    #[test]
    fn frontends_with_the_same_table_count_once() {
        let state = maglev(131_071, &["10.1.0.1:80", "10.1.0.2:80"]);
        let wanted: Vec<_> = (1..=40).map(|i| (frontend(i, 80), state.clone())).collect();
        assert_eq!(slots_needed(wanted.iter().map(|(f, s)| (f, s))), 131_071);
        // Another backend set (another target port) is another table.
        let other = maglev(131_071, &["10.1.0.1:81", "10.1.0.2:81"]);
        let mut two = wanted.clone();
        two.push((frontend(1, 81), other));
        assert_eq!(slots_needed(two.iter().map(|(f, s)| (f, s))), 262_142);
        let key = &state.service;
        assert_eq!(check(key, &two, DEFAULT_SLOT_BUDGET), Ok(()));
        let mut three = two.clone();
        three.push((frontend(1, 82), maglev(131_071, &["10.1.0.1:82"])));
        let err = check(key, &three, DEFAULT_SLOT_BUDGET).expect_err("over");
        assert_eq!(err.needed, 393_213);
        assert!(err.to_string().contains("demo/big"), "{err}");
        let desired: BTreeMap<_, _> = three.into_iter().collect();
        assert_eq!(over_budget(&desired, DEFAULT_SLOT_BUDGET), vec![err]);
    }

    #[test]
    fn listed_backends_and_empty_tables_cost_their_backends() {
        let mut state = maglev(16_381, &[]);
        assert_eq!(table_len(&state), 0, "no backends, no table");
        state.algorithm = Algorithm::Random;
        state.backends = vec!["10.1.0.1:80".parse().expect("addr")];
        assert_eq!(table_len(&state), 1);
    }
}
