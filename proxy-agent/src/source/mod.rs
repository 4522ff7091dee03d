//! Where objects come from. Sources only produce objects; they never touch maps.

pub mod manifest;
