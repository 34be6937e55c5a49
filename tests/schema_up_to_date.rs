//! The Rust code generated from `schema/*.capnp` is committed under
//! `src/schema/` (and the demo schema's, `crates/capnp-noise-test/schema/`,
//! under `crates/capnp-noise-test/src/schema/`) so that the crates build on
//! machines without the `capnp` compiler. This test regenerates it and fails when the committed copy is
//! stale. `scripts/regen-schema` (or `CAPNP_NOISE_REGEN=1 cargo test --test
//! schema_up_to_date`) rewrites the committed copy.
//!
//! Without the `capnp` binary the test cannot check anything: it fails under
//! CI (where `.ci/run` installs it) and reports a skip elsewhere.

use std::path::{Path, PathBuf};

/// Each schema: its directory and the directory of its committed Rust code,
/// both relative to the workspace root, and its file name.
const SCHEMAS: &[(&str, &str, &str)] = &[
    ("schema", "src/schema", "noise.capnp"),
    ("schema", "src/schema", "network.capnp"),
    (
        "crates/capnp-noise-test/schema",
        "crates/capnp-noise-test/src/schema",
        "demo.capnp",
    ),
];

/// True if the `capnp` compiler runs. Otherwise a failure under CI,
/// elsewhere a skip that is printed and counted (`capnp_noise_test::peers`).
fn capnp_available() -> bool {
    let check = capnp_noise_test::peers::runs("capnp", &["--version"]);
    capnp_noise_test::peers::usable("the capnp compiler (apt-get install capnproto)", check)
}

#[test]
fn generated_schema_code_is_up_to_date() {
    if !capnp_available() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regen = std::env::var_os("CAPNP_NOISE_REGEN").is_some();
    for (schema_dir, code_dir, s) in SCHEMAS {
        let out = tempfile::tempdir().expect("tempdir");
        capnpc::CompilerCommand::new()
            .src_prefix(root.join(schema_dir))
            .output_path(out.path())
            .default_parent_module(vec!["schema".into()])
            .import_path(root.join("schema"))
            .file(root.join(schema_dir).join(s))
            .run()
            .expect("capnp compile");
        let name = format!("{}_capnp.rs", s.trim_end_matches(".capnp"));
        let fresh = std::fs::read_to_string(out.path().join(&name)).expect("generated file");
        let committed_path: PathBuf = root.join(code_dir).join(&name);
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
