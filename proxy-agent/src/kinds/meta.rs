//! Object metadata: the name, namespace, labels, resource version (the
//! watcher resumes from it) and the annotations the model reads. The rest
//! (managed fields, owner references, other annotations) is skipped while
//! decoding.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

/// The annotations the model reads; the others are never decoded.
pub const KEPT_ANNOTATIONS: [&str; 3] = [
    crate::source::cluster::TRIGGER_TIME,
    crate::balancing::ALGORITHM_ANNOTATION,
    crate::balancing::TABLE_SIZE_ANNOTATION,
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "kept_annotations")]
    annotations: Option<BTreeMap<String, String>>,
    resource_version: Option<String>,
}

/// `metadata` with only what `Meta` keeps.
pub fn lean<'de, D: Deserializer<'de>>(decoder: D) -> Result<ObjectMeta, D::Error> {
    let Some(meta) = Option::<Meta>::deserialize(decoder)? else {
        return Ok(ObjectMeta::default());
    };
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta.labels,
        annotations: meta.annotations,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    })
}

fn kept_annotations<'de, D: Deserializer<'de>>(
    decoder: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    decoder.deserialize_option(Kept)
}

/// Visits an annotation map, keeping `KEPT_ANNOTATIONS` only; None when
/// none of them is there.
struct Kept;

impl<'de> Visitor<'de> for Kept {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of annotations")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, decoder: D) -> Result<Self::Value, D::Error> {
        decoder.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if KEPT_ANNOTATIONS.contains(&key.as_str()) {
                kept.insert(key, map.next_value::<String>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((!kept.is_empty()).then_some(kept))
    }
}
