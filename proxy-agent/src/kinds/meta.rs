//! Object metadata: the name, namespace and the labels and annotations the
//! model reads. The rest (managed fields, owner references, other labels
//! and annotations) is skipped while decoding.

use std::{collections::BTreeMap, fmt};

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

/// The labels the model reads; the others are never decoded.
pub const KEPT_LABELS: [&str; 3] = [
    crate::model::SERVICE_NAME_LABEL,
    crate::model::SERVICE_PROXY_NAME_LABEL,
    crate::model::HEADLESS_LABEL,
];

/// What the model reads of an object's metadata (the key is name and
/// namespace; labels say which Service a slice belongs to and whether an
/// object is another proxy's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "kept_labels")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "kept_annotations")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Read once, by the watcher (`Watched`), and not held.
    #[serde(default)]
    pub resource_version: Option<String>,
}

impl Meta {
    /// Absent or null: empty.
    pub(super) fn or_empty<'de, D: Deserializer<'de>>(decoder: D) -> Result<Meta, D::Error> {
        super::or_default(decoder)
    }
}

fn kept_labels<'de, D: Deserializer<'de>>(
    decoder: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    decoder.deserialize_option(Kept(&KEPT_LABELS))
}

fn kept_annotations<'de, D: Deserializer<'de>>(
    decoder: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    decoder.deserialize_option(Kept(&KEPT_ANNOTATIONS))
}

/// Visits a string map, keeping the listed keys only; None when none of
/// them is there.
struct Kept(&'static [&'static str]);

impl<'de> Visitor<'de> for Kept {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of strings")
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
            if self.0.contains(&key.as_str()) {
                kept.insert(key, map.next_value::<String>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((!kept.is_empty()).then_some(kept))
    }
}
