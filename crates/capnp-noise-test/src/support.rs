//! Small helpers the integration tests share.

use std::future::Future;
use std::time::Duration;

use crate::schema::demo_capnp::office;

/// Runs `f` on a fresh `LocalSet` (capnp-rpc is `!Send`).
pub async fn local<F: Future>(f: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(f).await
}

/// `f`, or a test failure naming `what` if it takes longer than `limit`.
///
/// # Panics
/// When `f` does not finish within `limit`.
pub async fn bounded<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no result within {limit:?}"),
    }
}

/// Asks `office` who the caller is: the VatId the server saw, in text form.
///
/// # Errors
/// The call's error.
pub async fn whoami(office: &office::Client) -> Result<String, capnp::Error> {
    let reply = office.whoami_request().send().promise.await?;
    Ok(reply.get()?.get_vat_id()?.to_string()?)
}
