//! End-to-end tests: our binaries against peers nobody here wrote
//! (libnbd's nbdinfo/nbdsh, qemu-img, fio, upstream nbdkit).

mod common;

mod filter_blocksize;
mod filter_cache;
mod filter_cow;
mod filter_delay;
mod filter_error;
mod filter_exitlast;
mod filter_exitwhen;
mod filter_fua;
mod filter_ip;
mod filter_limit;
mod filter_log;
mod filter_noextents;
mod filter_nozero;
mod filter_offset;
mod filter_partition;
mod filter_rate;
mod filter_readahead;
mod filter_retry;
mod filter_stats;
mod filter_truncate;
mod nbddump;
mod nbdinfo;
mod nbdkit_cli;
mod server_bad_input;
mod server_captive;
mod server_commands;
mod server_fio;
mod server_info;
mod server_qemu;
