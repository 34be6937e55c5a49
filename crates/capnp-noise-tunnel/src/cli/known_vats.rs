//! `capnp-noise known-vats`: manage trust-on-first-use records.

use std::path::PathBuf;

use capnp_noise::Tofu;

use super::CmdResult;

/// The `known-vats` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Forget the VatId recorded for an address, to accept a changed key
    /// deliberately; the next connection records the new one.
    Forget {
        /// The address exactly as it was dialed (HOST:PORT).
        #[arg(value_name = "ADDR")]
        address: String,
        /// The known-vats file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
}

pub(crate) fn run(cmd: Command) -> CmdResult {
    match cmd {
        Command::Forget { address, file } => {
            let removed = Tofu::new(&file).forget(&address)?;
            if removed == 0 {
                return Err(format!("no record for {address} in {}", file.display()).into());
            }
            println!(
                "forgot {removed} record(s) for {address} in {}",
                file.display()
            );
            Ok(())
        }
    }
}
