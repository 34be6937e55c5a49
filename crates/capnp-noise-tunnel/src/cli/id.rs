//! `capnp-noise id`: print the VatId of a key file.

use std::path::PathBuf;

use capnp_noise::Identity;

use super::CmdResult;

/// Arguments of `id`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
FILE may be a capnp-noise key, an `openssl genpkey -algorithm ed25519` key
(PKCS#8 PEM), or an unencrypted `ssh-keygen -t ed25519` private key.")]
pub(crate) struct Args {
    /// The key file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

pub(crate) fn run(args: Args) -> CmdResult {
    let identity = Identity::load(&args.file)?;
    println!("{}", identity.vat_id());
    Ok(())
}
