//! `capnp-noise package-files DIR` (hidden, for packagers): writes the
//! manual pages and the shell completions of this very binary's command
//! line.
//!
//! They are generated from the clap definition ([`super::Cli`]) by the
//! binary that is being packaged, so they cannot describe another version
//! of it: the `.deb` build (`.ci/run`) runs this subcommand of the release
//! binary, then packages its output with it. The subcommand is added to the
//! parser only ([`command`]), not to the definition it documents, so it
//! appears in no manual page, completion or `--help`.
//!
//! Layout of `DIR` (what `[package.metadata.deb]` in Cargo.toml installs):
//!
//! * `man/capnp-noise.1`, and one page per subcommand in git's style:
//!   `man/capnp-noise-tunnel.1`, `man/capnp-noise-tunnel-client.1`, ...
//! * `completions/capnp-noise.bash`, `completions/_capnp-noise` (zsh),
//!   `completions/capnp-noise.fish`.
//!
//! Cost: clap_mangen, roff and clap_complete (three small pure-Rust crates,
//! no build script) in this binary; they run only for this subcommand.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

use super::CmdResult;

/// The hidden subcommand's name.
pub(crate) const NAME: &str = "package-files";

/// The shells completions are written for, and their files' names.
pub(crate) const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "capnp-noise.bash"),
    (Shell::Zsh, "_capnp-noise"),
    (Shell::Fish, "capnp-noise.fish"),
];

/// The hidden subcommand, as the parser adds it to [`super::Cli`]'s.
pub(crate) fn command() -> clap::Command {
    clap::Command::new(NAME)
        .hide(true)
        .about("Write the manual pages and shell completions of this binary (for packagers).")
        .arg(
            clap::Arg::new("dir")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Where to write man/ and completions/ (created if missing)."),
        )
}

/// Runs the subcommand with the arguments clap matched.
pub(crate) fn run(matches: &clap::ArgMatches, documented: clap::Command) -> CmdResult {
    let dir = matches
        .get_one::<PathBuf>("dir")
        .expect("a required argument");
    write(documented, dir)?;
    eprintln!(
        "wrote manual pages to {} and completions to {}",
        dir.join("man").display(),
        dir.join("completions").display()
    );
    Ok(())
}

/// Writes the pages and completions of `documented` under `dir`.
pub(crate) fn write(documented: clap::Command, dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(documented.clone(), &man)?;
    for (shell, file) in SHELLS {
        let mut cmd = documented.clone();
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "capnp-noise", &mut out);
        std::fs::write(completions.join(file), out)?;
    }
    Ok(())
}
