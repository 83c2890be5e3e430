//! Unit tests of the qcow2 filter on an in-memory image.
