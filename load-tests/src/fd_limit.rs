//! The open-file limit a run with thousands of connections needs.

use anyhow::{bail, Context};

/// Raises the open-file soft limit to the hard limit, and fails when even that is below
/// `needed` descriptors (`what` says what they are for, in the error).
pub(crate) fn ensure_fd_limit(needed: u64, what: &str) -> anyhow::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit).context("raising the open-file soft limit to the hard limit")?;
    }
    match limit.current {
        Some(soft) if soft < needed => bail!(
            "{needed} file descriptors needed ({what}) but the open-file limit is {soft} (hard \
             limit); run with fewer connections or raise `ulimit -Hn`"
        ),
        _ => Ok(()),
    }
}
