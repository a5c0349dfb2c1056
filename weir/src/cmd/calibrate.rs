//! `weir calibrate`: the simulator's timing model next to the reference measurements of vllm-server-contract.md §7,
//! per GPU x model profile (TTFT at 512/2048/8192 prompt tokens alone; ITL at 1k context, batch 1/32/128).

use clap::{Args, ValueEnum};

/// Output format of the calibration table.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Md,
    Json,
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// `md` (a Markdown table for the README) or `json`.
    #[arg(long, value_enum, default_value = "md")]
    pub format: Format,
}

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let rows = sim::engine::calibrate::calibration()?;
    match args.format {
        Format::Md => print!("{}", sim::engine::calibrate::render_markdown(&rows)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
    }
    Ok(())
}
