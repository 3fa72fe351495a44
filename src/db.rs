//! Connecting to Postgres, with errors that never show a password.

use thiserror::Error;
use tokio_postgres::{Client, NoTls};

use crate::config::redact_url;

#[derive(Debug, Error)]
#[error("cannot connect to {url}: {reason}")]
pub struct ConnectError {
    /// The URL with its password hidden.
    pub url: String,
    pub reason: String,
}

/// Settings every Tally session uses, so that values rendered as text (a
/// view's group-key digest, verify's expected rows) are the same whatever
/// the server's or role's defaults are.
const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 1";

/// Opens a connection and drives it on a background task.
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|err| ConnectError {
                url: redact_url(url),
                reason: describe(&err),
            })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!("postgres connection closed: {err}");
        }
    });
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(|err| ConnectError {
            url: redact_url(url),
            reason: describe(&err),
        })?;
    Ok(client)
}

/// The most useful text of a Postgres error: the server's message (and
/// detail) when there is one, else the client's description.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

/// Whether retrying the same transaction can succeed: deadlocks,
/// serialization failures and lock timeouts, which concurrent appliers can
/// meet, and which must never escape to the user.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match err.code() {
        Some(code) => {
            *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::UNIQUE_VIOLATION
        }
        None => false,
    }
}

/// Whether the error means the server cannot be used right now (connection
/// lost or refused, server shutting down or starting, too many
/// connections), as opposed to a rejection of what was sent.
pub fn is_unavailable(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        if inner.is::<std::io::Error>() {
            return true;
        }
        source = inner.source();
    }
    match err.code() {
        // 08: connection exception; 57P0x: shutdown, crash, cannot connect
        // now; 53300: too many connections; 55000 covers a database that
        // does not accept connections now.
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }
        None => false,
    }
}
