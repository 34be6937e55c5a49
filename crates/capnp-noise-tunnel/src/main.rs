//! The `capnp-noise` command-line tool: see `capnp-noise --help`, and the
//! `cli` module for the subcommands and exit codes.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
