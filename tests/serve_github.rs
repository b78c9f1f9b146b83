//! Push-to-deploy (issue 7): signed GitHub push payloads for the configured branch deploy the
//! pushed commit through `cutover serve`; wrong signatures, other branches and other events do
//! nothing; quick pushes during a deploy leave the running one alone and only the newest
//! waiting one runs next.

mod common;
mod serve_support;

use std::time::Duration;

use common::FleetSpec;
use serve_support::{BRANCH, Gate, SECRET, Served, push_payload, push_payload_from, write_release};

const SHA_A: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const SHA_B: &str = "b2c3d4e5f60718293a4b5c6d7e8f901234567890";
const SHA_C: &str = "c3d4e5f60718293a4b5c6d7e8f90123456789012";

fn short(sha: &str) -> &str {
    &sha[..7]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_push_to_the_branch_deploys_once_and_nothing_else_does() {
    let served = Served::start(FleetSpec::new(2, 31)).await;
    write_release(&served, short(SHA_A), None);
    write_release(&served, short(SHA_B), None);
    let main_ref = format!("refs/heads/{BRANCH}");

    // ping → 200 (signed like every delivery).
    let (status, v) = served
        .hook(
            "ping",
            "{\"zen\":\"Keep it logically awesome.\",\"hook_id\":1}",
            Some(SECRET),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // Wrong signature, missing signature → 401, nothing queued.
    let body_b = push_payload(&main_ref, SHA_B);
    let (status, v) = served
        .hook("push", &body_b, Some("not-the-secret-at-all"))
        .await;
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("X-Hub-Signature-256"),
        "{v}"
    );
    let (status, _) = served.hook("push", &body_b, None).await;
    assert_eq!(status, 401);
    // A signature of another body (a replayed header) → 401.
    let tampered = body_b.replace("Make the thing faster", "Make the thing slower");
    let (status, _, _) = serve_support::request(
        served.addr,
        "POST",
        "/hooks/github",
        &[
            ("x-github-event", "push".into()),
            (
                "x-hub-signature-256",
                cutover::server::github::sign(SECRET.as_bytes(), body_b.as_bytes()),
            ),
        ],
        tampered,
    )
    .await;
    assert_eq!(status, 401);

    // GitHub's default content type, form-encoded: told what to change.
    let form = format!("payload={}", body_b.len());
    let (status, _, text) = serve_support::request(
        served.addr,
        "POST",
        "/hooks/github",
        &[
            ("x-github-event", "push".into()),
            ("content-type", "application/x-www-form-urlencoded".into()),
            (
                "x-hub-signature-256",
                cutover::server::github::sign(SECRET.as_bytes(), form.as_bytes()),
            ),
        ],
        form.clone(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("Content type to application/json"), "{text}");

    // Another branch, a tag, another event → 202 ignored.
    let (status, v) = served
        .hook(
            "push",
            &push_payload("refs/heads/feature", SHA_B),
            Some(SECRET),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["queued"], false, "{v}");
    // A push with a long file list (GitHub sends up to 25 MB) is read, not refused with 413.
    let mut big: serde_json::Value =
        serde_json::from_str(&push_payload("refs/heads/feature", SHA_B)).unwrap();
    big["head_commit"]["modified"] = (0..150_000)
        .map(|i| format!("src/generated/file_{i:06}.rs"))
        .collect();
    let big = big.to_string();
    assert!(big.len() > 3 << 20, "{}", big.len());
    let (status, v) = served.hook("push", &big, Some(SECRET)).await;
    assert_eq!((status, v["queued"].as_bool()), (202, Some(false)), "{v}");
    let (status, v) = served
        .hook("push", &push_payload("refs/tags/v9", SHA_B), Some(SECRET))
        .await;
    assert_eq!((status, v["queued"].as_bool()), (202, Some(false)), "{v}");
    let (status, v) = served
        .hook("issues", "{\"action\":\"opened\"}", Some(SECRET))
        .await;
    assert_eq!((status, v["queued"].as_bool()), (202, Some(false)), "{v}");

    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(
        q["running"].is_null()
            && q["queued"].as_array().unwrap().is_empty()
            && q["finished"].as_array().unwrap().is_empty(),
        "nothing was queued: {q}"
    );
    assert!(served.deployments().await.is_empty(), "no deployment");

    // The signed push to the branch → exactly one deploy of that commit, which succeeds.
    let (status, v) = served
        .hook("push", &push_payload(&main_ref, SHA_A), Some(SECRET))
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["queued"], true, "{v}");
    assert_eq!(v["job"]["version"], short(SHA_A));
    assert!(
        v["job"]["trigger"].as_str().unwrap().contains("alice"),
        "{v}"
    );
    let job = served.wait_job(v["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    served.fleet.assert_on(short(SHA_A)).await;
    let deployments = served.deployments().await;
    assert_eq!(deployments.len(), 1, "exactly one deploy: {deployments:#?}");
    assert_eq!(deployments[0]["to"], short(SHA_A));
    assert_eq!(deployments[0]["outcome"], "succeeded");
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert_eq!(q["finished"].as_array().unwrap().len(), 1, "{q}");

    // Review findings: clients that send headers and then stall their body once held every
    // webhook slot (4) for 30 s, and a real push meanwhile got a 503. Four of them now leave a
    // push its slot, and each is cut with a 408 once 5 s pass without a byte.
    let ping = "{\"zen\":\"Stalled.\",\"hook_id\":1}";
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(served.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut c,
            b"POST /hooks/github HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
        )
        .await
        .unwrap();
        stalled.push(c);
    }
    let (status, v) = served.hook("ping", ping, Some(SECRET)).await;
    assert_eq!(status, 200, "{v}");
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read_to_end(&mut stalled[0], &mut answer),
    )
    .await
    .expect("a stalled body is cut")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("no byte of the body came for 5s"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_pushes_during_a_deploy_run_only_the_newest_after_it() {
    let served = Served::start(FleetSpec::new(2, 32)).await;
    let mut gate = Gate::new(served.fleet.dir.path(), "a");
    // A's instance on web2 (the second batch) waits at the gate: the deploy is held mid-way.
    write_release(&served, short(SHA_A), Some(("web2", &gate)));
    write_release(&served, short(SHA_B), None);
    write_release(&served, short(SHA_C), None);
    let main_ref = format!("refs/heads/{BRANCH}");

    let (status, a) = served
        .hook("push", &push_payload(&main_ref, SHA_A), Some(SECRET))
        .await;
    assert_eq!(status, 202, "{a}");
    gate.wait_reached(Duration::from_secs(60)).await;
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert_eq!(q["running"]["id"], a["job"]["id"], "A runs: {q}");

    // Two quick pushes while A runs: B waits, then C replaces B (never A).
    let (status, b) = served
        .hook("push", &push_payload(&main_ref, SHA_B), Some(SECRET))
        .await;
    assert_eq!(status, 202, "{b}");
    assert!(
        b["replaced"].is_null(),
        "the running job is not replaced: {b}"
    );
    let (status, c) = served
        .hook("push", &push_payload(&main_ref, SHA_C), Some(SECRET))
        .await;
    assert_eq!(status, 202, "{c}");
    assert_eq!(
        c["replaced"]["id"], b["job"]["id"],
        "C replaces the queued B: {c}"
    );
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert_eq!(q["running"]["id"], a["job"]["id"], "{q}");
    let queued: Vec<_> = q["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    assert_eq!(queued, vec![c["job"]["id"].clone()], "only C waits: {q}");

    gate.open();
    let job_a = served.wait_job(a["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(
        job_a["outcome"],
        "succeeded",
        "the running one completes: {job_a}\n{}",
        served.log()
    );
    let job_c = served.wait_job(c["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job_c["outcome"], "succeeded", "{job_c}\n{}", served.log());
    let job_b = served.wait_job(b["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job_b["state"], "replaced", "{job_b}");
    assert_eq!(job_b["replaced_by"], c["job"]["id"]);

    let tos: Vec<String> = served
        .deployments()
        .await
        .iter()
        .rev()
        .map(|d| d["to"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tos, vec![short(SHA_A), short(SHA_C)], "A ran, then only C");
    served.fleet.assert_on(short(SHA_C)).await;
}

/// Review finding 1: a redelivered or replayed push (same delivery id, or the same before and
/// after under a new id, forced or not, the newest one too) never deploys again, also after a
/// restart of `cutover serve`; a push of the live commit is not deployed again either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_pushes_never_deploy_again_even_after_a_restart() {
    let mut served = Served::start(FleetSpec::new(2, 16)).await;
    write_release(&served, short(SHA_A), None);
    write_release(&served, short(SHA_B), None);
    let main_ref = format!("refs/heads/{BRANCH}");
    let zero = "1111111111111111111111111111111111111111";
    let not_queued = |(status, v): (u16, serde_json::Value), what: &str| {
        assert_eq!(status, 202, "{what}: {v}");
        assert_eq!(v["queued"], false, "{what} is not queued: {v}");
        v["ignored"].as_str().unwrap().to_string()
    };

    // A force push to A, then B on top of it: both deploy.
    let push_a = push_payload_from(&main_ref, zero, SHA_A, true);
    let (status, a) = served
        .hook_as("delivery-a", "push", &push_a, Some(SECRET))
        .await;
    assert_eq!((status, a["queued"].as_bool()), (202, Some(true)), "{a}");
    let job = served.wait_job(a["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    // GitHub's "Redeliver" (same id): acknowledged, not queued, also while A is the newest.
    let why = not_queued(
        served
            .hook_as("delivery-a", "push", &push_a, Some(SECRET))
            .await,
        "the same delivery",
    );
    assert!(why.contains("delivery-a"), "{why}");
    let push_b = push_payload_from(&main_ref, SHA_A, SHA_B, false);
    let (status, b) = served
        .hook_as("delivery-b", "push", &push_b, Some(SECRET))
        .await;
    assert_eq!((status, b["queued"].as_bool()), (202, Some(true)), "{b}");
    let job = served.wait_job(b["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());

    // After a restart, the journal still knows them.
    served.restart().await;
    not_queued(
        served
            .hook_as("delivery-a", "push", &push_a, Some(SECRET))
            .await,
        "the old force push redelivered",
    );
    let why = not_queued(
        served
            .hook_as("replay-a", "push", &push_a, Some(SECRET))
            .await,
        "the old force push replayed under a new id",
    );
    assert!(why.contains("redelivery"), "{why}");
    not_queued(
        served
            .hook_as("replay-b", "push", &push_b, Some(SECRET))
            .await,
        "the newest push replayed",
    );
    // A new push whose commit is live already: nothing to deploy.
    let why = not_queued(
        served
            .hook_as(
                "delivery-c",
                "push",
                &push_payload_from(&main_ref, SHA_C, SHA_B, false),
                Some(SECRET),
            )
            .await,
        "a push of the live commit",
    );
    assert!(why.contains("live"), "{why}");

    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(
        q["running"].is_null() && q["queued"].as_array().unwrap().is_empty(),
        "nothing queued after the restart: {q}"
    );
    let tos: Vec<String> = served
        .deployments()
        .await
        .iter()
        .rev()
        .map(|d| d["to"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        tos,
        vec![short(SHA_A), short(SHA_B)],
        "A, then B, nothing more"
    );
    served.fleet.assert_on(short(SHA_B)).await;
}

/// Review finding 3: with `serve.github.repository` set, a signed push from another repository
/// (one that shares the secret) is acknowledged and ignored; the job key names the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_from_another_repository_do_not_deploy() {
    let served = Served::start_with(FleetSpec::new(2, 18), "repository = \"Acme/Web\"\n").await;
    write_release(&served, short(SHA_A), None);
    let main_ref = format!("refs/heads/{BRANCH}");
    let evil = push_payload(&main_ref, SHA_A).replace("\"acme/web\"", "\"evil/web\"");
    assert!(evil.contains("evil/web"));
    let (status, v) = served.hook("push", &evil, Some(SECRET)).await;
    assert_eq!((status, v["queued"].as_bool()), (202, Some(false)), "{v}");
    assert_eq!(v["ignored"], "repository evil/web is not acme/web", "{v}");
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(
        q["running"].is_null() && q["finished"].as_array().unwrap().is_empty(),
        "nothing queued: {q}"
    );

    let (status, v) = served
        .hook("push", &push_payload(&main_ref, SHA_A), Some(SECRET))
        .await;
    assert_eq!((status, v["queued"].as_bool()), (202, Some(true)), "{v}");
    assert_eq!(v["job"]["key"], "push:acme/web:refs/heads/main", "{v}");
    let job = served.wait_job(v["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
}

/// Review finding (serve restart): `cutover serve` killed mid-deploy (push C -> D running,
/// D -> E queued) and started again keeps the queued push queued while the interrupted
/// deployment waits, says it is blocked and what to run, and deploys E by itself once the
/// deployment is resolved from the command line. Before, the queued job failed at once on
/// the interrupted deployment and left the journal's queue: the push was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_pushes_wait_for_an_interrupted_deployment_after_a_restart() {
    let mut served = Served::start(FleetSpec::new(2, 135)).await;
    let mut gate = Gate::new(served.fleet.dir.path(), "d");
    write_release(&served, short(SHA_A), None);
    write_release(&served, short(SHA_B), Some(("web2", &gate)));
    write_release(&served, short(SHA_C), None);
    let main_ref = format!("refs/heads/{BRANCH}");
    let zero = "1111111111111111111111111111111111111111";
    let queue = |(status, v): (u16, serde_json::Value)| {
        assert_eq!((status, v["queued"].as_bool()), (202, Some(true)), "{v}");
        v["job"]["id"].as_u64().unwrap()
    };

    let c = queue(
        served
            .hook(
                "push",
                &push_payload_from(&main_ref, zero, SHA_A, false),
                Some(SECRET),
            )
            .await,
    );
    let job = served.wait_job(c).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    // C -> D runs (held at the gate on web2), D -> E waits behind it.
    queue(
        served
            .hook(
                "push",
                &push_payload_from(&main_ref, SHA_A, SHA_B, false),
                Some(SECRET),
            )
            .await,
    );
    gate.wait_reached(Duration::from_secs(60)).await;
    let e = queue(
        served
            .hook(
                "push",
                &push_payload_from(&main_ref, SHA_B, SHA_C, false),
                Some(SECRET),
            )
            .await,
    );

    // kill -9 mid-deploy, start again: E stays queued, and the runner says why and what to run.
    served.restart().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let blocked = loop {
        let (status, v) = served.api("GET", "/api/status", None).await;
        assert_eq!(status, 200, "{v}");
        let queue = &v["queue"];
        assert!(queue["running"].is_null(), "nothing runs: {v}");
        assert_eq!(queue["queued"][0]["id"], e, "E is still queued: {v}");
        if let Some(why) = queue["blocked"].as_str() {
            assert_eq!(v["deployment"]["state"], "interrupted", "{v}");
            break why.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the runner never says it is blocked: {v}\n{}",
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        blocked.contains("was interrupted")
            && blocked.contains("deploy --resume")
            && blocked.contains("rollback"),
        "{blocked}"
    );
    assert!(served.log().contains(&blocked), "said in the log too");

    // Resolved from the command line: serve goes on by itself and deploys E.
    let (code, out, err) = served.fleet.cutover(&["rollback"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let job = served.wait_job(e).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    served.fleet.assert_on(short(SHA_C)).await;
    assert!(served.log().contains("was resolved"), "{}", served.log());
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(q["blocked"].is_null(), "{q}");
}

/// Review finding (replay past 256 pushes): `X-GitHub-Delivery` is not signed, so a captured
/// push replayed under a fresh delivery id must be known by its before and after among every
/// push the journal keeps, not only the newest 256: replayed after 300 later pushes, it is
/// ignored as a redelivery instead of moving the fleet back to its old commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_push_replayed_after_many_pushes_is_not_deployed_again() {
    let served = Served::start(FleetSpec::new(2, 136)).await;
    write_release(&served, short(SHA_A), None);
    write_release(&served, short(SHA_B), None);
    let main_ref = format!("refs/heads/{BRANCH}");
    let zero = "1111111111111111111111111111111111111111";
    let push_a = push_payload_from(&main_ref, zero, SHA_A, false);
    let (status, a) = served
        .hook_as("delivery-a", "push", &push_a, Some(SECRET))
        .await;
    assert_eq!((status, a["queued"].as_bool()), (202, Some(true)), "{a}");
    let job = served.wait_job(a["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());
    let (status, b) = served
        .hook_as(
            "delivery-b",
            "push",
            &push_payload_from(&main_ref, SHA_A, SHA_B, false),
            Some(SECRET),
        )
        .await;
    assert_eq!((status, b["queued"].as_bool()), (202, Some(true)), "{b}");
    let job = served.wait_job(b["job"]["id"].as_u64().unwrap()).await;
    assert_eq!(job["outcome"], "succeeded", "{job}\n{}", served.log());

    // 300 more pushes of the branch accepted since (recorded as serve records them: deploying
    // each would only take longer), continuing from B.
    let key = b["job"]["key"].as_str().unwrap();
    let journal =
        cutover::journal::Journal::open(&served.fleet.dir.path().join(".cutover")).unwrap();
    let mut before = SHA_B.to_string();
    for i in 0..300 {
        let after = format!("{i:040x}");
        journal
            .add_push(Some(&format!("later-{i}")), key, &before, &after)
            .unwrap();
        before = after;
    }

    // The push to A replayed under a fresh delivery id: ignored, the fleet stays on B.
    let (status, v) = served
        .hook_as("replay-a", "push", &push_a, Some(SECRET))
        .await;
    assert_eq!((status, v["queued"].as_bool()), (202, Some(false)), "{v}");
    let why = v["ignored"].as_str().unwrap();
    assert!(why.contains("redelivery"), "{why}");
    let (_, q) = served.api("GET", "/api/queue", None).await;
    assert!(
        q["running"].is_null() && q["queued"].as_array().unwrap().is_empty(),
        "nothing queued: {q}"
    );
    served.fleet.assert_on(short(SHA_B)).await;
}
