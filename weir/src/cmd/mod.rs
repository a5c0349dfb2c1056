//! One module per subcommand.

pub mod bench;
pub mod calibrate;
pub mod crdgen;
pub mod demo;
pub mod metrics_adapter;
pub mod plan;
pub mod replay;
pub mod serve;
pub mod sim;
pub mod tls;

/// Raise the open-files soft limit to the hard limit: a router holds two sockets per proxied stream (client and
/// upstream) and a load generator or simulated pod one per connection, so the usual soft limit of 1,024 would refuse
/// connections long before memory or CPU runs out. `want` is the number of descriptors the caller expects to need;
/// below it a warning says connections may fail.
pub fn raise_nofile_limit(want: Option<usize>) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if want.is_some_and(|w| (n as usize) < w + 64) => {
            tracing::warn!(
                limit = n,
                want,
                "open-file limit is below what this run needs; connections may fail"
            )
        }
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}
