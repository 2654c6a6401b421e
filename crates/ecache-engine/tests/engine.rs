//! The engine end to end on the demo model: answers equal a plain session's, requests
//! under different policies batched together each get their own answer, the KV cap bounds
//! what runs at once, cancellation and shutdown free what they held, and bad requests are
//! refused with the field at fault.

mod common;

use std::time::Duration;

use common::{ask, elastic, engine, reference, scenes};
use ecache_core::PolicyConfig;
use ecache_engine::{Event, FinishReason, ImageInput, Message, Part, Request, SubmitError, Task};
use ecache_model::{Role, Sampling};

const DESCRIBE: &str = ecache_demo::language::DESCRIBE;

fn greedy(max: usize) -> Sampling {
    Sampling {
        max_new_tokens: max,
        ..Sampling::default()
    }
}

#[test]
fn an_answer_equals_a_plain_sessions_and_streams_its_text() {
    let png = &scenes(1)[0];
    let e = engine(|_| {});
    let mut handle = e.submit(ask(png, DESCRIBE, None, 48)).unwrap();
    let mut streamed = String::new();
    let mut ids = Vec::new();
    let done = loop {
        match handle.blocking_next().unwrap() {
            Event::Token { id, text } => {
                ids.push(id);
                streamed.push_str(&text);
            }
            Event::Done(c) => break *c,
            Event::Failed(why) => panic!("{why}"),
        }
    };
    let full = PolicyConfig::new("full", 1.0);
    assert_eq!(done.tokens, reference(png, DESCRIBE, &full, greedy(48)));
    assert_eq!(ids, done.tokens);
    assert_eq!(streamed, done.text);
    assert!(done.text.starts_with("there are"), "{}", done.text);
    assert_eq!(done.finish_reason, FinishReason::Stop, "ends at EOS");
    assert_eq!(done.usage.completion_tokens, done.tokens.len());
    assert_eq!(done.usage.prompt_tokens, 92);
    assert_eq!(done.stats.image_tokens, 81);
    // A chat message with the image part and the text part builds the same prompt.
    let chat = Request::chat(vec![Message {
        role: Role::User,
        parts: vec![
            Part::Image(ImageInput::Bytes {
                data: png.clone(),
                name: "scene.png".into(),
            }),
            Part::Text(DESCRIBE.into()),
        ],
    }]);
    assert_eq!(e.generate(chat).unwrap().tokens, done.tokens);
}

/// A full cache reports budget 1 even when its config carries another budget (the default
/// config's 0.2); a budgeted policy reports its own.
#[test]
fn a_full_cache_reports_budget_one_whatever_its_config_says() {
    let png = &scenes(1)[0];
    let e = engine(|_| {});
    let full = e
        .generate(ask(png, DESCRIBE, Some(PolicyConfig::new("full", 0.2)), 4))
        .unwrap();
    assert_eq!(full.stats.budget, 1.0);
    let ours = e
        .generate(ask(png, DESCRIBE, Some(elastic(0.2)), 4))
        .unwrap();
    assert_eq!(ours.stats.budget, 0.2);
}

#[test]
fn mixed_policies_in_flight_together_each_get_their_solo_answer() {
    let pngs = scenes(8);
    let policies = [
        PolicyConfig::new("full", 1.0),
        elastic(0.2),
        PolicyConfig::new("h2o", 0.3),
        PolicyConfig::new("local", 0.5),
    ];
    let e = engine(|c| c.max_batch = 8);
    let questions = [DESCRIBE, "how many objects are there ?"];
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let q = questions[i % 2];
            let p = policies[i % 4].clone();
            e.submit(ask(&pngs[i], q, Some(p.clone()), 40)).unwrap()
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    assert!(e.stats().peak_active > 1, "requests ran together");
    for (i, answer) in answers.iter().enumerate() {
        let p = &policies[i % 4];
        let solo = reference(&pngs[i], questions[i % 2], p, greedy(40));
        assert_eq!(answer.tokens, solo, "request {i} under {}", p.name);
        assert_eq!(answer.stats.policy, p.name);
    }
    let stats = e.stats();
    assert_eq!(
        (stats.active, stats.kv_reserved, stats.kv_in_use),
        (0, 0, 0)
    );
    assert_eq!(stats.finished, 8);
}

#[test]
fn the_kv_cap_bounds_what_runs_and_a_smaller_budget_runs_more() {
    let pngs = scenes(12);
    let probe = engine(|_| {});
    let per_full = {
        let c = probe.generate(ask(&pngs[0], DESCRIBE, None, 24)).unwrap();
        let estimate = probe.estimate(ask(&pngs[0], DESCRIBE, None, 24)).unwrap();
        assert_eq!(estimate.bytes, c.stats.kv_reserved);
        // 92 prompt slots and 23 fed-back tokens, 4 layers of 2 KV heads of 64 in f32.
        assert_eq!(estimate.slots, 92 + 23);
        assert_eq!(estimate.bytes, 115 * 4 * 2 * 2 * 64 * 4);
        c.stats.kv_reserved
    };
    drop(probe);
    // Room for two full-cache requests.
    let cap = 2 * per_full + per_full / 2;
    let run = |policy: PolicyConfig| {
        let e = engine(|c| {
            c.kv_memory = Some(cap);
            c.max_batch = 64;
        });
        let handles: Vec<_> = pngs
            .iter()
            .map(|png| {
                let mut r = ask(png, DESCRIBE, Some(policy.clone()), 24);
                r.ignore_eos = true;
                e.submit(r).unwrap()
            })
            .collect();
        for h in handles {
            let c = h.wait().unwrap();
            assert_eq!(c.tokens.len(), 24, "ignore_eos runs to the limit");
            assert!(c.stats.kv_bytes <= c.stats.kv_reserved);
        }
        let s = e.stats();
        assert!(s.peak_kv_in_use <= cap, "{} > {cap}", s.peak_kv_in_use);
        s.peak_active
    };
    let full = run(PolicyConfig::new("full", 1.0));
    assert_eq!(full, 2, "two full-cache requests fit");
    let small = run(elastic(0.2));
    assert!(small >= 6, "elastic at 0.2 runs {small} at once");
}

#[test]
fn a_dropped_handle_cancels_and_frees_its_reservation() {
    let pngs = scenes(2);
    let e = engine(|_| {});
    let mut r = ask(&pngs[0], DESCRIBE, None, 400);
    r.ignore_eos = true;
    let mut h = e.submit(r).unwrap();
    // Wait until it runs, then leave.
    assert!(matches!(h.blocking_next(), Some(Event::Token { .. })));
    assert!(e.stats().kv_reserved > 0);
    drop(h);
    // The next request is served, and the cancelled one's memory is gone.
    e.generate(ask(&pngs[1], "how many objects are there ?", None, 8))
        .unwrap();
    let s = e.stats();
    assert_eq!((s.active, s.kv_reserved, s.kv_in_use), (0, 0, 0));
    assert_eq!(s.cancelled, 1);
}

#[test]
fn a_full_queue_refuses_and_others_still_run() {
    let pngs = scenes(3);
    let probe = engine(|_| {});
    let per = probe
        .generate(ask(&pngs[0], DESCRIBE, None, 200))
        .unwrap()
        .stats
        .kv_reserved;
    drop(probe);
    let e = engine(|c| {
        c.kv_memory = Some(per);
        c.max_queue = 1;
    });
    let mut long = ask(&pngs[0], DESCRIBE, None, 200);
    long.ignore_eos = true;
    let mut running = e.submit(long).unwrap();
    assert!(matches!(running.blocking_next(), Some(Event::Token { .. })));
    // The cap holds one request: the next waits, the one after finds the queue full.
    let waiting = e.submit(ask(&pngs[1], DESCRIBE, None, 200)).unwrap();
    let refused = e.submit(ask(&pngs[2], DESCRIBE, None, 200));
    assert!(
        matches!(refused, Err(SubmitError::QueueFull(1))),
        "{refused:?}"
    );
    drop(running);
    assert!(waiting.wait().is_ok());
}

#[test]
fn stop_strings_end_the_answer_before_them() {
    let png = &scenes(1)[0];
    let e = engine(|_| {});
    let plain = e.generate(ask(png, DESCRIBE, None, 48)).unwrap();
    let words: Vec<&str> = plain.text.split(' ').collect();
    assert!(words.len() > 6, "{}", plain.text);
    let stop = format!(" {} {}", words[4], words[5]);
    let mut r = ask(png, DESCRIBE, None, 48);
    r.stop = vec![stop.clone()];
    let mut h = e.submit(r).unwrap();
    let mut streamed = String::new();
    let done = loop {
        match h.blocking_next().unwrap() {
            Event::Token { text, .. } => streamed.push_str(&text),
            Event::Done(c) => break *c,
            Event::Failed(why) => panic!("{why}"),
        }
    };
    let cut = plain.text.find(&stop).unwrap();
    assert_eq!(done.text, plain.text[..cut]);
    assert_eq!(streamed, done.text, "the stop string is never streamed");
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert!(done.tokens.len() < plain.tokens.len());
}

#[test]
fn a_score_task_gives_the_answers_negative_log_likelihoods() {
    let png = &scenes(1)[0];
    let e = engine(|_| {});
    let answer = e.generate(ask(png, DESCRIBE, None, 48)).unwrap();
    let mut r = ask(png, DESCRIBE, None, 1);
    r.task = Task::Score {
        answer: answer.text.clone(),
    };
    let scored = e.generate(r).unwrap();
    let answer_tokens = answer.tokens.len() - 1; // without EOS
    assert_eq!(scored.nll.len(), answer_tokens);
    // The model's own greedy answer is likely under the model: each token's probability
    // is the largest, so its NLL is at most ln(vocab).
    assert!(scored.nll.iter().all(|&x| (0.0..(53f64).ln()).contains(&x)));
    assert!(scored.tokens.is_empty());
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let png = &scenes(1)[0];
    let e = engine(|c| c.kv_memory = Some(1 << 20));
    let param = |r: Request| match e.submit(r) {
        Err(SubmitError::Invalid { message, param }) => (param.unwrap_or_default(), message),
        other => panic!("not refused: {:?}", other.map(|h| h.id())),
    };
    let (p, m) = param(ask(png, DESCRIBE, Some(PolicyConfig::new("nope", 0.5)), 8));
    assert!(p == "policy" && m.contains("unknown policy `nope`"), "{m}");
    let (p, m) = param(ask(png, DESCRIBE, Some(PolicyConfig::new("h2o", 1.5)), 8));
    assert!(p == "policy" && m.contains("1.5"), "{m}");
    let mut bad_param = PolicyConfig::new("elastic", 0.2);
    bad_param.set_param("colour", "3").unwrap();
    let (p, m) = param(ask(png, DESCRIBE, Some(bad_param), 8));
    assert!(p == "policy" && m.contains("colour"), "{m}");
    let (p, m) = param(ask(png, DESCRIBE, None, 0));
    assert_eq!(p, "max_new_tokens", "{m}");
    let (p, m) = param(ask(png, DESCRIBE, None, 500));
    assert!(p == "max_new_tokens" && m.contains("context of 512"), "{m}");
    let (p, m) = param(ask(png, DESCRIBE, None, 300));
    assert!(
        p == "max_new_tokens" && m.contains("more than the cap"),
        "{m}"
    );
    let (p, m) = param(ask(&png[..100], DESCRIBE, None, 8));
    assert!(p == "image" && m.contains("scene.png"), "{m}");
    let (p, _) = param(ask(png, "   ", None, 8));
    assert_eq!(p, "prompt");
    let image = |png: &[u8]| {
        Part::Image(ImageInput::Bytes {
            data: png.to_vec(),
            name: "x.png".into(),
        })
    };
    let two = Request::chat(vec![Message {
        role: Role::User,
        parts: vec![image(png), image(png), Part::Text("how many ?".into())],
    }]);
    let (p, m) = param(two);
    assert!(p == "messages" && m.contains("one image"), "{m}");
    let sneaky = Request::chat(vec![Message::text(Role::User, "<image> how many ?")]);
    assert_eq!(param(sneaky).0, "messages");
    // Refusals left nothing behind, and the engine still answers.
    assert!(
        e.generate(ask(png, "how many objects are there ?", None, 8))
            .is_ok()
    );
    assert_eq!(e.stats().queued, 0);
}

#[test]
fn shutdown_finishes_what_was_accepted_and_refuses_the_rest() {
    let pngs = scenes(2);
    let e = engine(|_| {});
    let mut r = ask(&pngs[0], DESCRIBE, None, 60);
    r.ignore_eos = true;
    let h = e.submit(r).unwrap();
    let queued = e.submit(ask(&pngs[1], DESCRIBE, None, 20)).unwrap();
    e.shutdown(Duration::from_secs(60));
    assert_eq!(h.wait().unwrap().tokens.len(), 60);
    assert!(queued.wait().is_ok());
    assert!(matches!(
        e.submit(ask(&pngs[1], DESCRIBE, None, 8)),
        Err(SubmitError::ShuttingDown)
    ));
    // Past the deadline, what is left fails instead of hanging.
    let e = engine(|_| {});
    let mut r = ask(&pngs[0], DESCRIBE, None, 400);
    r.ignore_eos = true;
    let h = e.submit(r).unwrap();
    e.shutdown(Duration::ZERO);
    assert!(h.wait().is_err());
}
