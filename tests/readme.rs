//! The README's configuration reference is a file that works as written: it passes `--check`,
//! and served as is (on another port) it answers through its machine.

mod common;

use common::binary::{check, Proxy};

/// The ```toml block of the README that documents every key of the binary's file.
fn reference_config() -> String {
    let readme = include_str!("../README.md");
    readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("[route.process]") && block.contains("max_connections"))
        .expect("the README has its configuration reference")
        .to_owned()
}

#[tokio::test]
async fn the_configuration_reference_checks_and_serves() {
    let config = reference_config();
    let (code, stderr) = check(&config);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("WARN"),
        "the reference draws a warning: {stderr}"
    );

    let config = config.replacen("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"", 1);
    assert!(
        config.contains("127.0.0.1:0"),
        "the reference's listen line moved"
    );
    let proxy = Proxy::start(&config, &[]);
    for path in ["/app/", "/api/"] {
        let (status, _, body) = common::get_text(proxy.addr, path).await;
        assert_eq!(status, 200, "{path}: {body}\n{}", proxy.log());
        assert!(body.contains("Directory listing"), "{path}: {body}");
    }
}
