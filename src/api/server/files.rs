//! The process's open-file limit against `server.max_connections`: every connection is a file
//! descriptor, so a soft limit below it makes `accept` fail with `EMFILE` long before the
//! configured bound. At start the soft limit is raised towards the hard one as far as the
//! connections need (as Go's runtime and nginx's `worker_rlimit_nofile` do), and if even the
//! hard limit is too low the operator is told so, once, with the numbers.

use std::io;

/// Descriptors kept for what is not a subscriber's connection: listeners, upstream and Redis
/// or PostgreSQL connections, the outbox's files, logs.
pub const RESERVED: u64 = 256;

/// What to do with the open-file limit, given the current soft and hard limits and the number of
/// descriptors wanted.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Raise the soft limit to this.
    pub raise_to: Option<u64>,
    /// The soft limit after raising, if it is still short of what is wanted.
    pub short: Option<u64>,
}

/// Decides how far to raise the soft limit (never lowered, never above the hard limit).
pub fn plan(soft: u64, hard: u64, wanted: u64) -> Plan {
    if soft >= wanted {
        return Plan {
            raise_to: None,
            short: None,
        };
    }
    let target = wanted.min(hard);
    let raise_to = (target > soft).then_some(target);
    let after = raise_to.unwrap_or(soft);
    Plan {
        raise_to,
        short: (after < wanted).then_some(after),
    }
}

/// Raises the soft open-file limit for `max_connections` connections where the hard limit
/// allows, and logs what it did, or why connections past the limit will wait.
pub fn fit(max_connections: usize) {
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVED);
    let (soft, hard) = match limits() {
        Ok(limits) => limits,
        Err(error) => {
            tracing::debug!(%error, "could not read the open-file limit");
            return;
        }
    };
    let plan = plan(soft, hard, wanted);
    let mut now = soft;
    if let Some(raise_to) = plan.raise_to {
        match set_soft(raise_to, hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = raise_to,
                    "raised the open-file limit (RLIMIT_NOFILE) for server.max_connections"
                );
                now = raise_to;
            }
            Err(error) => {
                tracing::debug!(%error, to = raise_to, "could not raise the open-file limit");
            }
        }
    }
    if now < wanted {
        tracing::warn!(
            max_connections,
            open_file_limit = now,
            hard_limit = hard,
            reserved = RESERVED,
            "the open-file limit is below server.max_connections plus what the process itself \
             needs: past about {} connections new ones wait for a free descriptor; raise the \
             hard limit (`ulimit -Hn`, systemd `LimitNOFILE=`, Docker `--ulimit nofile=`) or \
             lower server.max_connections",
            now.saturating_sub(RESERVED)
        );
    }
}

fn limits() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` for the duration of the call.
    let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((as_u64(limit.rlim_cur), as_u64(limit.rlim_max)))
}

fn set_soft(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: from_u64(soft),
        rlim_max: from_u64(hard),
    };
    // SAFETY: `limit` is a valid `rlimit` read by the call; the hard limit is the one read.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RLIM_INFINITY` is the largest value: it stays the largest.
#[allow(clippy::useless_conversion, clippy::unnecessary_fallible_conversions)]
fn as_u64(value: libc::rlim_t) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[allow(clippy::useless_conversion, clippy::unnecessary_fallible_conversions)]
fn from_u64(value: u64) -> libc::rlim_t {
    if value == u64::MAX {
        return libc::RLIM_INFINITY;
    }
    libc::rlim_t::try_from(value).unwrap_or(libc::RLIM_INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_that_fits_is_left_alone() {
        assert_eq!(
            plan(1_048_576, 1_048_576, 10_256),
            Plan {
                raise_to: None,
                short: None
            }
        );
    }

    #[test]
    fn the_soft_limit_is_raised_as_far_as_needed() {
        assert_eq!(
            plan(1024, 524_288, 10_256),
            Plan {
                raise_to: Some(10_256),
                short: None
            }
        );
        assert_eq!(
            plan(1024, u64::MAX, 10_256),
            Plan {
                raise_to: Some(10_256),
                short: None
            }
        );
    }

    #[test]
    fn a_hard_limit_too_low_is_reported() {
        assert_eq!(
            plan(1024, 4096, 10_256),
            Plan {
                raise_to: Some(4096),
                short: Some(4096)
            }
        );
        assert_eq!(
            plan(4096, 4096, 10_256),
            Plan {
                raise_to: None,
                short: Some(4096)
            }
        );
    }

    #[test]
    fn the_process_limit_is_read_and_fitting_it_never_lowers_it() {
        let (soft, hard) = limits().expect("getrlimit");
        assert!(soft <= hard);
        fit(16);
        let (after, hard_after) = limits().expect("getrlimit");
        assert!(after >= soft && hard_after == hard);
    }
}
