//! The `/v1/chat` tool-call loop with the real pool and the real demo server (under the names
//! `demo` and `demo2`); the only fake is the LLM, a scripted OpenAI-compatible server on a
//! loopback port.

mod common;
#[path = "common/fake_llm.rs"]
mod fake_llm;

use common::test_config;
use fake_llm::{FakeLlm, Reply, TEST_API_KEY};
use mcp_pool::app::App;
use mcp_pool::llm::{
    ChatError, ChatEvent, ChatOutcome, ChatRequest, HistoryMessage, HistoryRole, LlmClient,
    LlmError, run_chat,
};
use mcp_pool::store::CredentialWriter;
use mcp_pool::store::{Secret, ServerName, Tokens, UserId};
use serde_json::{Value, json};
use tokio::sync::mpsc;

struct Harness {
    app: App,
    user: UserId,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// The pool with credentials stored for `servers` (so the others have none).
    async fn start(servers: &[&str]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let app = App::build(test_config(dir.path(), "", "")).await.unwrap();
        let user = UserId::parse("alice").unwrap();
        for server in servers {
            let tokens = Tokens {
                access_token: Some(Secret::new("token")),
                refresh_token: None,
                token_expiry: None,
            };
            app.storage
                .credentials
                .create(&user, &server_name(server), tokens)
                .await
                .unwrap();
        }
        Harness {
            app,
            user,
            _dir: dir,
        }
    }

    async fn chat(
        &self,
        llm: &LlmClient,
        servers: &[&str],
        req: ChatRequest,
        events: Option<mpsc::Sender<ChatEvent>>,
    ) -> Result<ChatOutcome, ChatError> {
        let servers = servers.iter().map(|s| server_name(s)).collect();
        run_chat(llm, &self.app.pool, &self.user, servers, req, events).await
    }

    async fn stop(self) {
        self.app.stop().await;
    }
}

fn server_name(name: &str) -> ServerName {
    ServerName::parse(name).unwrap()
}

fn llm(fake: &FakeLlm) -> LlmClient {
    LlmClient::new(&fake.config(), Some(Secret::new(TEST_API_KEY))).unwrap()
}

fn request(message: &str) -> ChatRequest {
    ChatRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// A step of four parallel calls: echo on demo, add on demo2, add with a string argument
/// (the server rejects it) and a function that was never offered.
fn four_calls() -> Reply {
    Reply::calls(&[
        ("call_echo", "demo__echo", json!({"message": "hello"})),
        ("call_add", "demo2__add", json!({"a": 2, "b": 3})),
        ("call_bad", "demo2__add", json!({"a": "two", "b": 3})),
        ("call_ghost", "demo__launch_rockets", json!({})),
    ])
}

const ANSWER: &str = "The echo said hello and 2 + 3 = 5; the other calls failed.";

fn function_names(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
        .collect()
}

/// What both the plain and the streamed loop must have sent the model.
fn assert_model_saw_the_loop(fake: &FakeLlm, history_len: usize) {
    let requests = fake.requests();
    assert_eq!(
        requests.len(),
        2,
        "one step with tools, one with the answer"
    );
    for sent in &requests {
        assert_eq!(
            sent.authorization.as_deref(),
            Some(format!("Bearer {TEST_API_KEY}").as_str())
        );
    }
    let first = &requests[0].body;
    assert_eq!(first["tool_choice"], "auto");
    let names = function_names(first);
    for name in [
        "demo__echo",
        "demo__add",
        "demo__whoami",
        "demo2__echo",
        "demo2__add",
    ] {
        assert!(names.contains(&name.to_owned()), "{name} not in {names:?}");
    }
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("demo__") || n.starts_with("demo2__"))
    );
    let add = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == "demo2__add")
        .unwrap();
    assert_eq!(add["type"], "function");
    assert_eq!(add["function"]["description"], "Returns a + b.");
    assert_eq!(add["function"]["parameters"]["type"], "object");
    assert_eq!(add["function"]["parameters"]["required"], json!(["a", "b"]));
    let first_messages = first["messages"].as_array().unwrap();
    assert_eq!(first_messages.len(), history_len + 1);
    assert_eq!(
        first_messages.last().unwrap(),
        &json!({"role": "user", "content": "Echo hello and add 2 and 3"})
    );

    let second = &requests[1].body;
    assert_eq!(function_names(second), names, "the same tools every step");
    let messages = second["messages"].as_array().unwrap();
    assert_eq!(messages.len(), history_len + 1 + 1 + 4);
    let assistant = &messages[history_len + 1];
    assert_eq!(assistant["role"], "assistant");
    let ids: Vec<&str> = assistant["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["call_echo", "call_add", "call_bad", "call_ghost"]);
    assert_eq!(assistant["tool_calls"][1]["type"], "function");
    assert_eq!(assistant["tool_calls"][1]["function"]["name"], "demo2__add");
    let args: Value = serde_json::from_str(
        assistant["tool_calls"][1]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args, json!({"a": 2, "b": 3}));

    let tool_messages = &messages[history_len + 2..];
    for (message, id) in tool_messages.iter().zip(&ids) {
        assert_eq!(message["role"], "tool");
        assert_eq!(message["tool_call_id"], *id);
    }
    assert_eq!(tool_messages[0]["content"], "hello");
    assert_eq!(tool_messages[1]["content"], "5");
    let bad: Value = serde_json::from_str(tool_messages[2]["content"].as_str().unwrap()).unwrap();
    assert_eq!(bad["is_error"], true);
    assert!(
        bad["error"].as_str().unwrap().contains("must be a number"),
        "{bad}"
    );
    let ghost: Value = serde_json::from_str(tool_messages[3]["content"].as_str().unwrap()).unwrap();
    assert_eq!(ghost["is_error"], true);
    assert_eq!(ghost["code"], "unknown_function");
}

fn assert_trace(outcome: &ChatOutcome) {
    assert_eq!(outcome.reply, ANSWER);
    assert_eq!(outcome.steps, 2);
    assert!(outcome.skipped_servers.is_empty());
    assert_eq!(
        outcome.usage.total_tokens, 36,
        "usage summed over both steps"
    );
    let rows: Vec<(&str, Option<&str>, &str, bool)> = outcome
        .trace
        .iter()
        .map(|t| {
            (
                t.id.as_str(),
                t.server.as_ref().map(|s| s.as_str()),
                t.tool.as_str(),
                t.is_error,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("call_echo", Some("demo"), "echo", false),
            ("call_add", Some("demo2"), "add", false),
            ("call_bad", Some("demo2"), "add", true),
            ("call_ghost", None, "demo__launch_rockets", true),
        ]
    );
    assert!(outcome.trace.iter().all(|t| t.step == 1));
    assert_eq!(outcome.trace[0].arguments, json!({"message": "hello"}));
    assert_eq!(outcome.trace[0].error, None);
    assert!(
        outcome.trace[2]
            .error
            .as_deref()
            .unwrap()
            .contains("must be a number")
    );
    assert!(
        outcome.trace[3]
            .error
            .as_deref()
            .unwrap()
            .contains("launch_rockets")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_on_two_servers_one_failing_then_an_answer() {
    let h = Harness::start(&["demo", "demo2"]).await;
    let fake = FakeLlm::start([four_calls(), Reply::text(ANSWER)]).await;
    let req = ChatRequest {
        message: "Echo hello and add 2 and 3".into(),
        history: vec![
            HistoryMessage {
                role: HistoryRole::User,
                content: "Hi!".into(),
            },
            HistoryMessage {
                role: HistoryRole::Assistant,
                content: "Hello, how can I help?".into(),
            },
        ],
        ..Default::default()
    };
    let outcome = h
        .chat(&llm(&fake), &["demo", "demo2"], req, None)
        .await
        .unwrap();
    assert_trace(&outcome);
    assert_model_saw_the_loop(&fake, 2);
    let first = &fake.requests()[0].body;
    assert_eq!(
        first["messages"][0],
        json!({"role": "user", "content": "Hi!"})
    );
    assert_eq!(
        first["messages"][1],
        json!({"role": "assistant", "content": "Hello, how can I help?"})
    );
    assert!(first.get("stream").is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_reports_events_in_order_and_ends_with_done() {
    let h = Harness::start(&["demo", "demo2"]).await;
    let fake = FakeLlm::start([four_calls(), Reply::text(ANSWER)]).await;
    let (tx, mut rx) = mpsc::channel(4);
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event);
        }
        events
    });
    let outcome = h
        .chat(
            &llm(&fake),
            &["demo", "demo2"],
            request("Echo hello and add 2 and 3"),
            Some(tx),
        )
        .await
        .unwrap();
    let events = collector.await.unwrap();
    assert_trace(&outcome);
    assert_model_saw_the_loop(&fake, 0);
    assert!(fake.requests().iter().all(|r| r.body["stream"] == true));

    // Every call starts before it finishes, and all calls of step 1 finish before any text of
    // step 2.
    let position = |want: &dyn Fn(&ChatEvent) -> bool| events.iter().position(want).unwrap();
    for id in ["call_echo", "call_add", "call_bad", "call_ghost"] {
        let started =
            position(&|e| matches!(e, ChatEvent::ToolCallStarted { id: i, .. } if i == id));
        let finished =
            position(&|e| matches!(e, ChatEvent::ToolCallFinished { id: i, .. } if i == id));
        assert!(started < finished, "{id}: {events:#?}");
        let first_text = position(&|e| matches!(e, ChatEvent::TextDelta { .. }));
        assert!(finished < first_text, "{id}: {events:#?}");
    }
    let started_echo = events
        .iter()
        .find_map(|e| match e {
            ChatEvent::ToolCallStarted {
                id,
                server,
                tool,
                arguments,
            } if id == "call_echo" => Some((server.clone(), tool.clone(), arguments.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        started_echo,
        (
            Some(server_name("demo")),
            "echo".into(),
            json!({"message": "hello"})
        )
    );
    let errors: Vec<(String, bool)> = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::ToolCallFinished { id, is_error, .. } => Some((id.clone(), *is_error)),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 4);
    assert!(errors.contains(&("call_bad".into(), true)));
    assert!(errors.contains(&("call_echo".into(), false)));

    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::TextDelta { text, step } => {
                assert_eq!(*step, 2);
                Some(text.as_str())
            }
            _ => None,
        })
        .collect();
    assert!(deltas.len() > 1, "the answer is streamed in pieces");
    assert_eq!(deltas.concat(), ANSWER);
    match events.last().unwrap() {
        ChatEvent::Done(done) => assert_eq!(done, &outcome),
        other => panic!("last event: {other:?}"),
    }
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, ChatEvent::Done(_)))
            .count(),
        1
    );
    let wire = serde_json::to_value(events.last().unwrap()).unwrap();
    assert_eq!(wire["type"], "done");
    assert_eq!(wire["trace"][1]["server"], "demo2");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_never_stops_calling_tools_hits_max_steps() {
    let h = Harness::start(&["demo"]).await;
    let echo = |id: &str| Reply::calls(&[(id, "demo__echo", json!({"message": "again"}))]);
    let fake = FakeLlm::start([echo("c1"), echo("c2"), echo("c3"), echo("c4")]).await;
    let mut config = fake.config();
    config.max_steps = 2;
    let llm = LlmClient::new(&config, None).unwrap();

    let err = h
        .chat(&llm, &["demo"], request("loop forever"), None)
        .await
        .unwrap_err();
    let ChatError::MaxStepsExceeded { max_steps, trace } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*max_steps, 2);
    // Two model requests; the first step's call ran, the second's did not.
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(trace.len(), 1);
    assert_eq!(trace[0].id, "c1");
    assert!(!trace[0].is_error);
    assert_eq!(err.code(), "max_steps_exceeded");

    // Streaming: the same, reported as the last event.
    let (tx, mut rx) = mpsc::channel(64);
    let err = h
        .chat(&llm, &["demo"], request("loop forever"), Some(tx))
        .await
        .unwrap_err();
    assert!(matches!(err, ChatError::MaxStepsExceeded { .. }));
    let mut last = None;
    while let Some(event) = rx.recv().await {
        last = Some(event);
    }
    assert!(
        matches!(&last, Some(ChatEvent::Error { code, .. }) if code == "max_steps_exceeded"),
        "{last:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_errors_are_typed_and_never_carry_the_api_key() {
    let h = Harness::start(&["demo"]).await;
    let fake = FakeLlm::start([
        Reply::error(401, &format!("Incorrect API key provided: {TEST_API_KEY}")),
        Reply::error(
            500,
            "The server had an error while processing your request.",
        ),
        Reply::error(500, "again"),
    ])
    .await;
    let llm = llm(&fake);

    let err = h
        .chat(&llm, &["demo"], request("hi"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ChatError::Llm(LlmError::Status { status: 401, .. })),
        "{err:?}"
    );
    assert_eq!(err.code(), "llm_unauthorized");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(TEST_API_KEY), "{text}");
    }

    let err = h
        .chat(&llm, &["demo"], request("hi"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ChatError::Llm(LlmError::Status { status: 500, message }) if message.contains("processing your request")),
        "{err:?}"
    );

    // Streaming: an error event ends the stream.
    let (tx, mut rx) = mpsc::channel(64);
    let err = h
        .chat(&llm, &["demo"], request("hi"), Some(tx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "llm_error");
    let mut events = Vec::new();
    while let Some(event) = rx.recv().await {
        events.push(event);
    }
    assert!(
        matches!(events.as_slice(), [ChatEvent::Error { code, .. }] if code == "llm_error"),
        "{events:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_credentials_is_skipped_and_reported() {
    // alice has credentials for demo only.
    let h = Harness::start(&["demo"]).await;
    let fake = FakeLlm::start([Reply::text("Only demo is available.")]).await;
    let (tx, mut rx) = mpsc::channel(64);
    let outcome = h
        .chat(
            &llm(&fake),
            &["demo", "demo3"],
            request("what can you do?"),
            Some(tx),
        )
        .await
        .unwrap();
    assert_eq!(outcome.reply, "Only demo is available.");
    assert_eq!(outcome.skipped_servers.len(), 1);
    assert_eq!(outcome.skipped_servers[0].server.as_str(), "demo3");
    assert_eq!(outcome.skipped_servers[0].code, "no_credentials");
    let names = function_names(&fake.requests()[0].body);
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| n.starts_with("demo__")), "{names:?}");
    let first = rx.recv().await.unwrap();
    assert!(
        matches!(&first, ChatEvent::ServerSkipped { server, code, .. } if server.as_str() == "demo3" && code == "no_credentials"),
        "{first:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_servers_the_model_gets_no_tools_and_an_empty_message_is_refused() {
    let h = Harness::start(&[]).await;
    let fake = FakeLlm::start([Reply::text("Just chatting.")]).await;
    let llm = llm(&fake);
    let outcome = h.chat(&llm, &[], request("hello"), None).await.unwrap();
    assert_eq!(outcome.reply, "Just chatting.");
    let body = &fake.requests()[0].body;
    assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());

    let err = h.chat(&llm, &[], request("  "), None).await.unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert_eq!(
        fake.requests().len(),
        1,
        "nothing sent for an invalid request"
    );
    h.stop().await;
}

/// The demo server counts sleeps running at once: proof that one step's calls run
/// concurrently, and no more than `max_parallel_tool_calls` of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_steps_calls_run_concurrently_up_to_the_limit() {
    let h = Harness::start(&["demo"]).await;
    for (limit, expected_peak) in [(4, 3), (2, 2)] {
        // A fresh session, so the server's peak counter starts at zero.
        h.app
            .pool
            .close_session(&h.user, &server_name("demo"))
            .await
            .unwrap();
        // Long enough that only a hang of seconds between dispatching the calls could keep
        // them from overlapping.
        let sleep = |id: &str| (id.to_owned(), json!({"ms": 5000}));
        let sleeps: Vec<(String, Value)> = vec![sleep("s1"), sleep("s2"), sleep("s3")];
        let calls: Vec<(&str, &str, Value)> = sleeps
            .iter()
            .map(|(id, args)| (id.as_str(), "demo__sleep", args.clone()))
            .collect();
        let fake = FakeLlm::start([
            Reply::calls(&calls),
            Reply::calls(&[("st", "demo__stats", json!({}))]),
            Reply::text("done"),
        ])
        .await;
        let mut config = fake.config();
        config.max_parallel_tool_calls = limit;
        let llm = LlmClient::new(&config, None).unwrap();
        let outcome = h
            .chat(&llm, &["demo"], request("sleep three times"), None)
            .await
            .unwrap();
        assert_eq!(outcome.trace.len(), 4);
        assert!(
            outcome.trace.iter().all(|t| !t.is_error),
            "{:?}",
            outcome.trace
        );
        let third = &fake.requests()[2].body;
        let stats = third["messages"].as_array().unwrap().last().unwrap();
        assert_eq!(stats["tool_call_id"], "st");
        let stats: Value = serde_json::from_str(stats["content"].as_str().unwrap()).unwrap();
        assert_eq!(
            stats["peak_concurrent_sleeps"], expected_peak,
            "limit {limit}: {stats}"
        );
    }
    h.stop().await;
}
