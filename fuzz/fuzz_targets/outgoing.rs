//! Any job properties the AMQP parser accepts: the message sendgate builds
//! from them carries only the allow-list, and only its own x-sendgate-*
//! headers.
#![no_main]

use std::sync::OnceLock;

use lapin::types::AMQPValue;
use libfuzzer_sys::fuzz_target;
use sendgate::amqp::message::outgoing;
use sendgate::config::{AmqpSettings, Settings};
use sendgate_core::decision::{DeadLetter, Decision, Forward, Wait};
use sendgate_core::plan::{Charge, Plan, Reason};

fn settings() -> &'static AmqpSettings {
    static SETTINGS: OnceLock<AmqpSettings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        Settings::load_from(None, Vec::new())
            .expect("the defaults load")
            .amqp
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok((_, properties)) = lapin::protocol::basic::parse_properties(data) else {
        return;
    };
    let now = chrono::Utc::now();
    let decisions = [
        Decision::Forward(Forward {
            reservation_id: uuid::Uuid::nil(),
            plan: Plan::Free,
            charge: Charge::Credit,
            remaining: Some(3),
            fresh: true,
        }),
        Decision::dead_letter(Reason::OutOfCredits, "none left"),
        Decision::Defer(DeadLetter {
            reason: Reason::DailyLimitReached,
            detail: "tomorrow".to_owned(),
            retry_after: Some(now + chrono::TimeDelta::hours(5)),
        }),
        Decision::Wait(Wait {
            reservation_id: uuid::Uuid::nil(),
        }),
    ];
    for decision in &decisions {
        let message = outgoing(settings(), &properties, Some("k"), Some("acct"), decision, now)
            .expect("a message for every decision but a duplicate");
        let p = &message.properties;
        assert!(p.user_id().is_none() && p.priority().is_none() && p.cluster_id().is_none());
        // Only a waiting copy expires by itself (a deferred job waits in
        // a step of the deferral ladder, whose queue has the TTL).
        assert_eq!(
            p.expiration().is_some(),
            matches!(decision, Decision::Wait(_))
        );
        // A held job goes through the hold exchange, its account as
        // routing key, its queue in `sendgate-hold`.
        if matches!(decision, Decision::Defer(_) | Decision::Wait(_)) {
            assert_eq!(message.exchange.as_str(), settings().hold_exchange());
            assert_eq!(message.routing_key.as_str(), "acct");
        }
        assert_eq!(p.delivery_mode(), &Some(2));
        let headers = p.headers().as_ref().expect("sendgate's headers");
        // Only sendgate's own headers for this decision, never the job's.
        let refused = matches!(decision, Decision::DeadLetter(_));
        let forwarded = matches!(decision, Decision::Forward(_));
        for name in ["x-sendgate-reason", "x-sendgate-detail"] {
            assert_eq!(headers.inner().contains_key(name), refused, "{name}");
        }
        assert_eq!(headers.inner().contains_key("x-sendgate-plan"), forwarded);
        for (name, value) in headers {
            let name = name.as_str().to_ascii_lowercase();
            assert!(name != "cc" && name != "bcc" && name != "x-death", "{name}");
            if name == "x-sendgate-decision" {
                assert!(matches!(value, AMQPValue::LongString(_)));
            }
        }
    }
});
