//! The dashboard in a real browser against a real stack: a nats-server,
//! `rollcall discovery` and `rollcall balancer` as processes, three web
//! instances each announced by its own `rollcall agent` process, and a
//! headless Chromium on the balancer's admin port. The page shows the three
//! instances, their request rates while requests flow, and an instance whose
//! agent is killed with SIGKILL (its server gone too) leaves the page once
//! its TTL passes, without a reload. A screenshot is kept at
//! `target/dashboard.png`.

#[path = "support/browser.rs"]
mod browser;
#[path = "support/cli.rs"]
mod cli;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use browser::Browser;
use cli::{rollcall, Process};
use serde_json::Value;
use support::http::{client, get, HttpBackend};
use support::{crate_root, eventually, free_port, wait_for_port, NatsServer};

const START: Duration = Duration::from_secs(20);
/// The agents' TTL (3 s, the default) and discovery's expiry with room for
/// the snapshot to reach the balancer and the page.
const GONE: Duration = Duration::from_secs(10);

/// The rows the page shows: `[id, state, rate]` each.
const ROWS: &str = "JSON.stringify([...document.querySelectorAll('tr[data-instance]')].map(r => \
     [r.dataset.instance, r.dataset.state, Number(r.querySelector('.rate').textContent)]))";

async fn rows(page: &Browser) -> Vec<(String, String, f64)> {
    let text = page.evaluate(ROWS).await;
    let rows: Vec<(String, String, f64)> =
        serde_json::from_str(text.as_str().expect("a JSON string")).expect("rows");
    rows
}

fn ids(rows: &[(String, String, f64)]) -> Vec<&str> {
    rows.iter().map(|(id, _, _)| id.as_str()).collect()
}

/// One web instance: its server in this process, announced by an agent.
struct Web {
    backend: HttpBackend,
    agent: Process,
}

async fn start_web(nats: &str, id: &str) -> Web {
    let backend = HttpBackend::start(id).await;
    let port = backend.port().to_string();
    let check = format!("http://127.0.0.1:{port}/");
    let agent = Process::spawn(rollcall(&[
        "agent",
        "--nats",
        nats,
        "--service",
        "web",
        "--id",
        id,
        "--address",
        "127.0.0.1",
        "--port",
        &port,
        "--check",
        &check,
        "--tag",
        "v1",
        "--tag",
        "eu-west",
    ]));
    Web { backend, agent }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_real_stack_live() {
    let nats = NatsServer::start();
    let url = nats.url();
    let discovery = Process::spawn(rollcall(&["discovery", "--nats", &url]));
    discovery.wait_stderr("leading the catalog", START);
    let (listen, admin) = (free_port(), free_port());
    let (listen_at, admin_at) = (format!("127.0.0.1:{listen}"), format!("127.0.0.1:{admin}"));
    let _balancer = Process::spawn(rollcall(&[
        "balancer", "--nats", &url, "--listen", &listen_at, "--admin", &admin_at, "web",
    ]));
    wait_for_port(admin, START);
    let mut webs = Vec::new();
    for id in ["web-1", "web-2", "web-3"] {
        webs.push(start_web(&url, id).await);
    }

    let page = Browser::start(1280, 860).await;
    page.open(&format!("http://{admin_at}/")).await;
    page.evaluate("window.notReloaded = true").await;
    eventually("the page to show three live instances", START, || async {
        let rows = rows(&page).await;
        let live = rows.iter().all(|(_, state, _)| state == "live");
        (ids(&rows) == ["web-1", "web-2", "web-3"] && live).then_some(())
    })
    .await;

    let tags = page
        .evaluate("document.querySelector('tr[data-instance=\"web-1\"] .tags').textContent")
        .await;
    assert_eq!(tags, "v1eu-west", "each tag its own badge");

    // Requests through the balancer, until the end of the test.
    let load = Arc::new(AtomicBool::new(true));
    let requests = tokio::spawn({
        let (load, url) = (load.clone(), format!("http://{listen_at}/"));
        async move {
            let client = client();
            let mut answered = 0u64;
            while load.load(Ordering::Relaxed) {
                if matches!(get(&client, &url).await, Ok((status, _)) if status == 200) {
                    answered += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            answered
        }
    });
    eventually("a request rate on every instance", START, || async {
        let rows = rows(&page).await;
        (rows.len() == 3 && rows.iter().all(|(_, _, rate)| *rate > 0.0)).then_some(())
    })
    .await;
    let p99 = page
        .evaluate("document.querySelector('tr[data-instance] .p99').textContent")
        .await;
    assert!(p99.as_str().is_some_and(|t| t.ends_with("ms")), "{p99}");

    // An operator drains web-2: the page says so, and who did it.
    let mut command = rollcall(&["drain", "web/web-2", "--nats", &url, "--by", "alice"]);
    let drain = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run rollcall drain");
    assert!(drain.status.success(), "{drain:?}");
    eventually("web-2 to show as drained by alice", START, || async {
        let state = page
            .evaluate("document.querySelector('tr[data-instance=\"web-2\"] .state').textContent")
            .await;
        let text = state.as_str().unwrap_or_default().to_owned();
        (text.contains("draining") && text.contains("drained by alice")).then_some(())
    })
    .await;

    // web-3 dies: its agent is killed without a word, its server closes.
    let web3 = webs.pop().expect("web-3");
    web3.agent.signal("KILL");
    web3.backend.kill();
    eventually("web-3 to leave the page", GONE, || async {
        (ids(&rows(&page).await) == ["web-1", "web-2"]).then_some(())
    })
    .await;
    let left = page
        .evaluate("[...document.querySelectorAll('#events li[data-kind=left]')].map(li => li.textContent).join('\\n')")
        .await;
    assert!(
        left.as_str().is_some_and(|t| t.contains("web / web-3")),
        "{left}"
    );
    assert_eq!(
        page.evaluate("window.notReloaded === true").await,
        Value::Bool(true),
        "the page changed without a reload"
    );
    assert_eq!(
        page.evaluate("document.getElementById('link').dataset.state")
            .await,
        "live"
    );

    let shot = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate_root().join("target"), Into::into)
        .join("dashboard.png");
    page.screenshot(&shot).await;
    println!("dashboard screenshot: {}", shot.display());

    load.store(false, Ordering::Relaxed);
    let answered = requests.await.expect("load task");
    assert!(answered > 0);
}
