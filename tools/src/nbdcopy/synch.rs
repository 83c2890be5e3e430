//! `--synchronous`: one operation at a time, strictly in order, on one
//! connection; for servers that cannot take several requests at once.
//! The same operations as the pipelined strategy (extents, zero
//! detection, zeroing), without any overlap.

use std::sync::Arc;

use super::endpoint::{Extent, OpError};
use super::ops::{extents_of, Copier, Op, Planner};

/// Copy everything; returns the number of bytes copied.
pub async fn copy(c: Arc<Copier>, use_extents: bool) -> Result<u64, OpError> {
    let chunk = c.settings.request_size;
    let Some(size) = c.src.size() else {
        // A stream: read until it ends.
        let mut offset = 0;
        loop {
            let op = Op {
                offset,
                length: chunk,
                zero: false,
            };
            let (buf, holes) = c.read(&op).await?;
            let n = buf.len() as u64;
            c.write(buf, holes, offset).await?;
            offset += n;
            if n < chunk {
                return Ok(offset);
            }
        }
    };
    let use_extents = use_extents && c.src.can_extents();
    let mut planner = Planner::new(chunk, c.dst.max_zero());
    let mut offset = 0;
    while offset < size {
        let length = c.src.extents_window().min(size - offset);
        let list = if use_extents {
            extents_of(&*c.src, offset, length).await?
        } else {
            vec![Extent::new(offset, length, false)]
        };
        for e in list {
            planner.push(e);
        }
        c.progress.add(planner.take_skipped());
        run_ready(&c, &mut planner).await?;
        offset += length;
    }
    planner.finish();
    run_ready(&c, &mut planner).await?;
    Ok(size)
}

async fn run_ready(c: &Copier, planner: &mut Planner) -> Result<(), OpError> {
    while let Some(op) = planner.pop() {
        if op.zero {
            c.zero(&op).await?;
        } else {
            let (buf, holes) = c.read(&op).await?;
            c.write(buf, holes, op.offset).await?;
        }
    }
    Ok(())
}
