//! One module per subcommand.

pub mod bench;
pub mod calibrate;
pub mod replay;
pub mod serve;
pub mod sim;
