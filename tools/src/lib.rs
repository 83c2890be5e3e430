//! The tools of the toolkit as library code; `src/bin/*` are thin mains.

pub mod nbdkit;
