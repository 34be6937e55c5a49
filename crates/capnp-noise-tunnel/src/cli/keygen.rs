//! `capnp-noise keygen`: generate and save a new identity.

use std::path::PathBuf;

use capnp_noise::keyfile::DEFAULT_KEY_FILE;
use capnp_noise::Identity;

use super::CmdResult;

/// Arguments of `keygen`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The key is written as PKCS#8 PEM (readable by `openssl pkey`), atomically and
with mode 0600 (on Windows, with the access rules of its folder: keep it in
one only you can read). Only the VatId is printed on stdout, so
`VAT=$(capnp-noise keygen -o my.key)` captures it.")]
pub(crate) struct Args {
    /// Where to write the new key.
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_KEY_FILE)]
    output: PathBuf,
    /// Replace FILE if it exists (its identity is lost for good).
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(args: Args) -> CmdResult {
    let identity = Identity::generate();
    identity.save(&args.output, args.force)?;
    println!("{}", identity.vat_id());
    eprintln!(
        "wrote a new identity to {} (keep this file secret)",
        args.output.display()
    );
    Ok(())
}
