//! The tools of the toolkit as library code; `src/bin/*` are thin mains.

pub mod cli;
pub mod nbdcopy;
pub mod nbddump;
pub mod nbdfuse;
pub mod nbdinfo;
pub mod nbdkit;
