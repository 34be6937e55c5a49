//! The Rust code generated from `schema/*.capnp` is committed under
//! `src/schema/` so that the crate builds on machines without the `capnp`
//! compiler. This test regenerates it and fails when the committed copy is
//! stale. `scripts/regen-schema` (or `CAPNP_NOISE_REGEN=1 cargo test --test
//! schema_up_to_date`) rewrites the committed copy.
//!
//! Without the `capnp` binary the test cannot check anything: it fails under
//! CI (where `.ci/run` installs it) and reports a skip elsewhere.

use std::path::{Path, PathBuf};

const SCHEMAS: &[&str] = &["noise.capnp", "network.capnp", "demo.capnp"];

fn capnp_available() -> bool {
    std::process::Command::new("capnp")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn generated_schema_code_is_up_to_date() {
    if !capnp_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the capnp compiler is required under CI to check src/schema/ (apt-get install capnproto)"
        );
        eprintln!("skipping: the `capnp` compiler is not installed");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = capnpc::CompilerCommand::new();
    cmd.src_prefix(root.join("schema"))
        .output_path(out.path())
        .default_parent_module(vec!["schema".into()]);
    for s in SCHEMAS {
        cmd.file(root.join("schema").join(s));
    }
    cmd.run().expect("capnp compile");

    let regen = std::env::var_os("CAPNP_NOISE_REGEN").is_some();
    for s in SCHEMAS {
        let name = format!("{}_capnp.rs", s.trim_end_matches(".capnp"));
        let fresh = std::fs::read_to_string(out.path().join(&name)).expect("generated file");
        let committed_path: PathBuf = root.join("src/schema").join(&name);
        if regen {
            std::fs::write(&committed_path, &fresh).expect("write generated code");
            continue;
        }
        let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
        assert!(
            committed == fresh,
            "{} is stale: run scripts/regen-schema and commit the result",
            committed_path.display()
        );
    }
}
