//! Reloads what may change while the gateway runs — the callers file, the TLS files, the event
//! rules file and the alert rules file (with the secret files it names) — on
//! SIGHUP and whenever their content changes, without dropping a connection.
//!
//! Content is polled rather than watched with inotify: Kubernetes updates a mounted Secret by
//! swapping a symlink, which file watches miss or report late, while reading a few small files
//! every `CXGW_RELOAD_INTERVAL` costs nothing and works everywhere. SIGHUP reloads at once for
//! those who want the change in force before they move on.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::MissedTickBehavior;

use crate::alerts::RuleSet;
use crate::alerts::rules::Reloaded as RulesReloaded;
use crate::auth::{CallerRegistry, Reloaded};
use crate::shutdown::Drain;
use crate::tls::ReloadingTls;

/// Everything that reloads.
#[derive(Debug, Clone, Default)]
pub struct Reloadable {
    pub callers: Option<CallerRegistry>,
    pub tls: Option<Arc<ReloadingTls>>,
    pub rules: Option<Arc<crate::rules::EventRules>>,
    pub alert_rules: Option<RuleSet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Signal,
    Poll,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::Poll => "change",
        }
    }
}

/// The last failure of each kind, so a broken file is reported once per distinct problem rather
/// than at every poll.
#[derive(Default)]
struct Failures {
    callers: Option<String>,
    tls: Option<String>,
    rules: Option<String>,
    alert_rules: Option<String>,
}

impl Reloadable {
    fn is_empty(&self) -> bool {
        self.callers
            .as_ref()
            .and_then(CallerRegistry::path)
            .is_none()
            && self.tls.is_none()
            && self.rules.as_ref().and_then(|rules| rules.file()).is_none()
            && self.alert_rules.is_none()
    }

    fn reload(&self, trigger: Trigger, failures: &mut Failures) {
        if let Some(callers) = &self.callers
            && let Some(path) = callers.path()
        {
            match callers.reload() {
                Ok(Reloaded::Replaced { callers }) => {
                    failures.callers = None;
                    tracing::info!(
                        file = %path.display(),
                        callers,
                        trigger = trigger.as_str(),
                        "callers reloaded"
                    );
                }
                Ok(Reloaded::Unchanged) => failures.callers = None,
                Err(error) => {
                    if trigger == Trigger::Signal || failures.callers.as_ref() != Some(&error) {
                        tracing::warn!(
                            setting = "CXGW_CALLERS_FILE",
                            %error,
                            "cannot reload the callers, keeping the previous ones"
                        );
                    }
                    failures.callers = Some(error);
                }
            }
        }
        if let Some(rules) = &self.rules
            && let Some(path) = rules.file()
        {
            match rules.reload() {
                Ok(crate::rules::Reloaded::Replaced { rules: count }) => {
                    failures.rules = None;
                    tracing::info!(
                        file = %path.display(),
                        rules = count,
                        version = %rules.current().version,
                        trigger = trigger.as_str(),
                        "event rules reloaded"
                    );
                }
                Ok(crate::rules::Reloaded::Unchanged) => failures.rules = None,
                Err(error) => {
                    if trigger == Trigger::Signal || failures.rules.as_ref() != Some(&error) {
                        tracing::warn!(
                            setting = "CXGW_EVENT_RULES_FILE",
                            file = %path.display(),
                            %error,
                            "event rules file refused, keeping the rules in force"
                        );
                    }
                    failures.rules = Some(error);
                }
            }
        }
        if let Some(rules) = &self.alert_rules {
            match rules.reload() {
                Ok(RulesReloaded::Replaced { rules: count }) => {
                    failures.alert_rules = None;
                    crate::alerts::metrics::count_reload(false);
                    for rule in rules.current().iter() {
                        crate::alerts::metrics::register_rule(&rule.name);
                    }
                    tracing::info!(
                        file = %rules.path().display(),
                        rules = count,
                        trigger = trigger.as_str(),
                        "alert rules reloaded"
                    );
                }
                Ok(RulesReloaded::Unchanged) => failures.alert_rules = None,
                Err(error) => {
                    // Counted once per distinct problem, like the line: a broken file is one
                    // refusal, not one per poll.
                    if trigger == Trigger::Signal || failures.alert_rules.as_ref() != Some(&error) {
                        crate::alerts::metrics::count_reload(true);
                        tracing::warn!(
                            setting = "CXGW_ALERT_RULES_FILE",
                            %error,
                            "cannot reload the alert rules, keeping the previous ones"
                        );
                    }
                    failures.alert_rules = Some(error);
                }
            }
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(true) => {
                    failures.tls = None;
                    tracing::info!(trigger = trigger.as_str(), "tls certificates reloaded");
                }
                Ok(false) => failures.tls = None,
                Err(error) => {
                    let error = format!("{error:#}");
                    if trigger == Trigger::Signal || failures.tls.as_ref() != Some(&error) {
                        tracing::warn!(
                            %error,
                            "cannot reload the tls certificates, keeping the previous ones"
                        );
                    }
                    failures.tls = Some(error);
                }
            }
        }
    }
}

/// Starts watching. The SIGHUP handler is installed before this returns, so a signal sent once
/// the server is up never falls back to the default action (which would end the process).
pub fn spawn(reloadable: Reloadable, interval: Duration, drain: Drain) {
    if reloadable.is_empty() {
        return;
    }
    let hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP, reloading only on change");
            None
        }
    };
    tokio::spawn(watch(reloadable, hangup, interval, drain));
}

async fn watch(
    reloadable: Reloadable,
    mut hangup: Option<Signal>,
    interval: Duration,
    drain: Drain,
) {
    let mut failures = Failures::default();
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick fires at once; everything was just loaded.
    ticks.tick().await;
    let drained = drain.signaled();
    let mut drained = std::pin::pin!(drained);
    loop {
        let trigger = tokio::select! {
            () = &mut drained => return,
            _ = ticks.tick() => Trigger::Poll,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => Trigger::Signal,
        };
        // Reading and parsing files blocks; keep it off the runtime's worker threads, logging
        // to the same subscriber as this task.
        let work = reloadable.clone();
        let mut taken = std::mem::take(&mut failures);
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        failures = match tokio::task::spawn_blocking(move || {
            tracing::dispatcher::with_default(&dispatch, || work.reload(trigger, &mut taken));
            taken
        })
        .await
        {
            Ok(failures) => failures,
            Err(error) => {
                tracing::error!(%error, "a reload failed unexpectedly");
                Failures::default()
            }
        };
    }
}
