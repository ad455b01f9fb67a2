//! End-to-end: `lkvm fork` turns a running guest into more running guests that share its
//! memory as it was at the fork. Children hold the parent's in-memory files, diverge on their
//! own (a write in one reaches neither the parent nor a sibling, and the parent's later writes
//! reach no child), read random numbers of their own, answer `lkvm exec` and `lkvm list`, and
//! end cleanly; a second fork carries what the parent changed since the first.

mod common;

use std::time::Duration;

use common::*;

fn home_env(home: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![("HOME", home.to_str().unwrap().to_string()), ("XDG_CACHE_HOME", String::new())]
}

/// The token, the files a child and the parent write after the fork (or that there are none),
/// 16 random bytes as hex, and how many VM generation changes the guest was told of (ACPI GED).
const PEEK: &str = "cat /root/token; cat /root/mine 2>/dev/null || echo no-mine; \
                    cat /root/after 2>/dev/null || echo no-after; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                    echo generation-events=$(grep ACPI:Ged /proc/interrupts | tr -s ' ' | cut -d' ' -f3)";

#[test]
fn a_running_guest_forks_into_children_that_share_its_memory_and_diverge() {
    if !kvm_available("a_running_guest_forks_into_children_that_share_its_memory_and_diverge") {
        return;
    }
    let _one_at_a_time = boot_lock();
    let home = temp_dir();
    let env = home_env(&home);
    let token = format!("token-{}", std::process::id());
    let vmlinux = guest().vmlinux.to_str().unwrap();
    let args = [
        "run",
        "-k",
        vmlinux,
        "-m",
        "256",
        "-c",
        "1",
        "--name",
        "fkp",
        "--snapshottable",
        "-n",
        "mode=none",
        "-p",
        HOST_GUEST_PARAMS,
    ];
    // Nothing panics while the guest runs (it would be left running): what each step gave is
    // kept, and checked once the parent has ended.
    let steps = std::sync::Mutex::new(Vec::new());
    let lkvm_with = |args: &[&str]| run_with_input(lkvm(), args, &env, b"", Duration::from_secs(600));
    let out = run_interactive_with(
        &args,
        &env,
        "# ",
        || {
            let mut steps = steps.lock().unwrap();
            let mut step = |label: &str, args: &[&str]| steps.push((label.to_string(), lkvm_with(args)));
            let exec = |name: &'static str, script: String| {
                ["exec", "-n", name, "--", "/bin/sh", "-c"]
                    .map(String::from)
                    .into_iter()
                    .chain([script])
                    .collect::<Vec<_>>()
            };
            let mut run = |label: &str, args: Vec<String>| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                step(label, &args)
            };
            run("token", exec("fkp", format!("echo {token} > /root/token")));
            run("fork", ["fork", "-n", "fkp", "--count", "2", "--prefix", "kid"].map(String::from).to_vec());
            run("taken", ["fork", "-n", "fkp", "--prefix", "kid"].map(String::from).to_vec());
            // Each exec is one guest's first work since the fork: where guest kernel code is
            // emulated, it takes a minute to fault its pages in, so each guest gets one.
            run("kid-0", exec("kid-0", format!("{PEEK}; echo kid-0 > /root/mine")));
            run("fkp", exec("fkp", format!("{PEEK}; echo after > /root/after")));
            run("kid-1", exec("kid-1", PEEK.to_string()));
            // The parent's pages changed since its memory was frozen go to this child too.
            run("fork again", ["fork", "-n", "fkp", "--prefix", "gen2"].map(String::from).to_vec());
            run("gen2-0", exec("gen2-0", PEEK.to_string()));
            run("list", vec!["list".to_string()]);
            for child in ["kid-0", "kid-1", "gen2-0"] {
                run(&format!("stop {child}"), ["stop", "-n", child].map(String::from).to_vec());
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while lkvm_with(&["list"]).stdout.lines().any(|l| l.contains("kid-") || l.contains("gen2-"))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            run("list after", vec!["list".to_string()]);
            "exit\n".into()
        },
        boot_timeout(),
    );
    assert_eq!(out.code, Some(0), "the parent ends with its shell: {}", out.describe());
    let steps = steps.into_inner().unwrap();
    let step = |label: &str| -> &Outcome {
        let (_, outcome) = steps.iter().find(|(l, _)| l == label).unwrap_or_else(|| panic!("no step {label}"));
        outcome
    };
    for (label, outcome) in &steps {
        if label != "taken" {
            assert_eq!(outcome.code, Some(0), "{label}: {}", outcome.describe());
        }
    }
    assert!(step("fork").stdout.contains("forked into kid-0 kid-1"), "{}", step("fork").describe());
    let taken = step("taken");
    assert_eq!(taken.code, Some(1));
    assert!(taken.stderr.contains("a guest named 'kid-0' is already running"), "{}", taken.describe());
    let expect = |label: &str, mine: &str, after: &str, generation_events: &str| {
        let got: Vec<&str> = step(label).stdout.lines().collect();
        assert_eq!(got.len(), 5, "{label}: {got:?}");
        assert_eq!(got[..3], [token.as_str(), mine, after], "{label}: {got:?}");
        assert_eq!(got[4], format!("generation-events={generation_events}"), "{label}: {got:?}");
        got[3].to_string()
    };
    // Each child starts from the parent's memory: its token, nobody's writes since.
    let kid0 = expect("kid-0", "no-mine", "no-after", "1");
    let parent = expect("fkp", "no-mine", "no-after", "0");
    let kid1 = expect("kid-1", "no-mine", "no-after", "1");
    expect("gen2-0", "no-mine", "after", "1");
    // Each child got a new VM generation ID (ACPI), reseeded its random number generator and so
    // does not share the parent's future random numbers.
    assert!(kid0.len() == 32 && kid0 != kid1 && kid0 != parent && kid1 != parent, "{kid0} {kid1} {parent}");
    let list = &step("list").stdout;
    for name in ["fkp", "kid-0", "kid-1", "gen2-0"] {
        assert!(list.lines().any(|l| l.contains(name) && l.contains("running")), "{name} in {list}");
    }
    assert!(!step("list after").stdout.contains("kid-"), "the children ended: {}", step("list after").stdout);
    std::fs::remove_dir_all(home).unwrap();
}
