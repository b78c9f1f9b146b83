//! The deploy report (issue 7): a finished deploy's HTML report holds the timeline chart with
//! both releases and the served/failed numbers, equal to what the balancer counted while the
//! deployment ran. `cutover show ID --html` prints its path.

mod common;
mod serve_support;

use std::time::Duration;

use common::FleetSpec;
use cutover::balancer::Balancer;
use cutover::load::{self, LoadSpec};
use serve_support::{Gate, Served, write_release};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_of_a_finished_deploy_has_the_chart_and_the_balancers_numbers() {
    let served = Served::start(FleetSpec::new(2, 35)).await;
    served.deploy("v1", "succeeded").await;
    let mut gate = Gate::new(served.fleet.dir.path(), "v2");
    write_release(&served, "v2", Some(("web2", &gate)));

    // No traffic from here until the deploy is mid-way, and none after: every request the
    // balancer counts between `before` and `after` was served while the deployment ran.
    let client = served.fleet.client();
    let before = client.stats().await.unwrap();
    let job = served.queue_deploy("v2").await;
    gate.wait_reached(Duration::from_secs(60)).await;
    // web1 runs v2, web2 still v1: traffic reaches both releases.
    let run = load::start(LoadSpec {
        target: served.fleet.listen,
        path: "/".into(),
        rate: 200,
        max_requests: 20_000,
        max_duration: Duration::from_secs(60),
        concurrency: 4,
        headers: Vec::new(),
    });
    tokio::time::timeout(Duration::from_secs(30), run.wait_until(|r| r.ok >= 400))
        .await
        .expect("traffic flows");
    let traffic = run.stop().await;
    let after = client.stats().await.unwrap();
    gate.open();
    let job = served.wait_job(job).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    let id = job["deployment"].as_str().unwrap().to_string();
    assert_eq!(
        client.stats().await.unwrap().total.requests,
        after.total.requests,
        "no traffic after"
    );

    let served_n =
        after.total.requests - before.total.requests + (after.unrouted - before.unrouted);
    let failed_n =
        after.total.status_5xx - before.total.status_5xx + (after.unrouted - before.unrouted);
    let by = |r: &str| {
        after.releases.get(r).map_or(0, |c| c.requests)
            - before.releases.get(r).map_or(0, |c| c.requests)
    };
    assert!(
        by("v1") > 0 && by("v2") > 0,
        "both releases served: {after:#?}"
    );
    assert_eq!(
        served_n,
        traffic.ok + traffic.failed,
        "the balancer counted every request: {traffic}"
    );
    assert_eq!(failed_n, 0, "{traffic}");

    // The file, where `cutover show ID --html` says it is.
    let (code, out, err) = served.fleet.cutover(&["show", &id, "--html"]).await;
    assert_eq!(code, 0, "{err}");
    let path = std::path::PathBuf::from(out.trim());
    assert!(path.ends_with(format!("reports/{id}.html")), "{out}");
    let html = std::fs::read_to_string(&path).unwrap();
    let artifacts =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("deploy-report.html"), &html).unwrap();
    assert!(
        html.contains(&format!("{served_n} served, {failed_n} failed")),
        "served/failed as the balancer counted them ({served_n}/{failed_n}):\n{}",
        html.lines()
            .filter(|l| l.contains("served"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        html.contains(&format!("v1: {}", by("v1"))) && html.contains(&format!("v2: {}", by("v2"))),
        "per release"
    );
    // The chart: share areas of both releases, the error line, a marker per step.
    assert!(html.contains("<svg id=\"timeline\""));
    assert!(
        html.contains("class=\"share\" data-release=\"v1\""),
        "v1 in the chart"
    );
    assert!(
        html.contains("class=\"share\" data-release=\"v2\""),
        "v2 in the chart"
    );
    assert!(html.contains("class=\"errors\""));
    let (_, d) = served
        .api("GET", &format!("/api/deployments/{id}"), None)
        .await;
    let steps = d["steps"].as_array().unwrap().len();
    assert!(steps > 0);
    assert_eq!(
        html.matches("<line class=\"step\"").count(),
        steps,
        "a marker per step"
    );
    assert!(
        html.contains("<table>") && html.contains("<td>start</td>"),
        "the steps table"
    );
    // Self-contained: no external asset, no script.
    for bad in ["<script", "src=\"http", "href=\"http", "@import", "url("] {
        assert!(!html.contains(bad), "{bad} in the report");
    }
    // The timeline was sampled densely while the deploy ran (every ~250 ms).
    let rates = d["rates"].as_array().unwrap();
    assert!(rates.len() >= 4, "{rates:?}");

    // `show --html` without an id: the newest deployment.
    let (code, out2, _) = served.fleet.cutover(&["show", "--html"]).await;
    assert_eq!((code, out2.trim()), (0, out.trim()));
}
