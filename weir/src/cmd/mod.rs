//! One module per subcommand.

pub mod bench;
pub mod calibrate;
pub mod demo;
pub mod replay;
pub mod serve;
pub mod sim;
