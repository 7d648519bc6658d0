//! The checked-in bindings are exactly what `prost-build` generates from the proto today.

use std::path::{Path, PathBuf};

fn generate(out: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let descriptors = protox::compile(
        [root.join("proto/gtfs-realtime.proto")],
        [root.join("proto")],
    )
    .unwrap_or_else(|e| panic!("proto/gtfs-realtime.proto does not compile: {e}"));
    prost_build::Config::new()
        .out_dir(out)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("prost-build failed: {e}"));
    out.join("transit_realtime.rs")
}

#[test]
fn checked_in_bindings_match_the_proto() {
    let out = std::env::temp_dir().join(format!("patchwire-gtfs-rt-{}", std::process::id()));
    std::fs::create_dir_all(&out).expect("create a temporary directory");
    let fresh = std::fs::read_to_string(generate(&out)).expect("read the generated bindings");
    let _ = std::fs::remove_dir_all(&out);
    let checked_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transit_realtime.rs");
    if std::env::var_os("PATCHWIRE_REGENERATE").is_some() {
        std::fs::write(&checked_in, &fresh).expect("write src/transit_realtime.rs");
        return;
    }
    let current = std::fs::read_to_string(&checked_in).unwrap_or_default();
    assert!(
        current == fresh,
        "src/transit_realtime.rs is not what prost-build generates from proto/gtfs-realtime.proto; \
         run `PATCHWIRE_REGENERATE=1 cargo test -p patchwire-gtfs-rt` and commit the result"
    );
}
