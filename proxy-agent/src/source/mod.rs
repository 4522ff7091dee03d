//! Where objects come from. Sources only produce objects; they never touch maps.

pub mod cluster;
pub mod host;
pub mod kubernetes;
pub mod manifest;
pub mod route;
