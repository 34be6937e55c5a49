//! Introductions as a [`Network`] makes and redeems them: the introducer's
//! [`Network::introduce`], [`Network::provide`] and [`Network::withdraw`],
//! and the recipient's [`Network::redeem`]. The provider's side is the
//! `Vat` service ([`super::service`]).

use std::time::SystemTime;

use capnp::capability::FromClientHook;

use crate::error::{Error, IntroductionError, Result};
use crate::intro::{random_nonce, Introduction, Nonce, ThirdPartyToAwait};
use crate::sturdy::{Address, MAX_ADDRESSES};
use crate::vat_id::VatId;

use super::{service, Network};

/// What a provider knows about an introduction being redeemed: given to the
/// hook of [`NetworkBuilder::on_redeem`](super::NetworkBuilder::on_redeem).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Redeemed {
    /// The vat that asked to set the capability aside and signed the introduction.
    pub introducer: VatId,
    /// The authenticated vat redeeming it (the introduction's final holder).
    pub redeemer: VatId,
    /// The handoff's nonce.
    pub nonce: Nonce,
}

fn rpc_failure(during: &'static str, source: capnp::Error) -> Error {
    Error::Rpc { during, source }
}

impl Network {
    /// Bob's side of an introduction, step 1 alone: asks `provider` to set
    /// `cap` aside for `request`'s recipient, over this vat's connection to
    /// it. `cap` must be a capability `provider` hosts, obtained over that
    /// connection. Returns the addresses the provider advertises.
    /// [`Network::introduce`] does this and signs the introduction.
    ///
    /// # Errors
    /// [`Error::Introduction`] with the provider's refusal
    /// ([`IntroductionError::NotHosted`] for a capability it does not host
    /// itself, `Expired`, `Replayed`, `Limit`, ...); the errors of
    /// [`Network::connect`]; [`Error::Rpc`] if the call fails.
    pub async fn provide<C: FromClientHook>(
        &self,
        cap: &C,
        provider: &VatId,
        request: &ThirdPartyToAwait,
    ) -> Result<Vec<Address>> {
        let root = self.root(provider).await?;
        let mut call = root.provide_request();
        {
            let mut p = call.get();
            request.write_to(p.reborrow().init_await());
            p.init_cap()
                .set_as_capability(cap.as_client_hook().add_ref());
        }
        let timeout = self.inner.options.connect_timeout;
        let reply = tokio::time::timeout(timeout, call.send().promise)
            .await
            .map_err(|_| Error::Introduction(IntroductionError::Timeout))?
            .map_err(|e| rpc_failure("call Vat.provide", e))?;
        let reply = reply
            .get()
            .map_err(|e| rpc_failure("call Vat.provide", e))?;
        service::check(reply.get_error(), reply.get_reason())?;
        let addresses = crate::sturdy::read_addresses(reply.get_addresses()).map_err(|e| {
            Error::Introduction(IntroductionError::Malformed(format!(
                "the provider's addresses: {e}"
            )))
        })?;
        Ok(addresses)
    }

    /// Bob's side of an introduction: sets `cap` (hosted by `provider`)
    /// aside at the provider for `recipient`, then signs and returns the
    /// [`Introduction`] to give to `recipient` (for example
    /// `introduction.encode()` as a parameter of an ordinary call). It is
    /// valid for [`NetworkConfig::introduction_lifetime`](super::NetworkConfig::introduction_lifetime), names the
    /// addresses the provider advertises and those this vat knows, and can
    /// be redeemed once, by `recipient` only.
    ///
    /// # Errors
    /// The errors of [`Network::provide`]; [`Error::Misuse`] if `recipient`
    /// or `provider` is this vat.
    pub async fn introduce<C: FromClientHook>(
        &self,
        cap: &C,
        provider: &VatId,
        recipient: &VatId,
    ) -> Result<Introduction> {
        if *recipient == self.inner.vat_id || *provider == self.inner.vat_id {
            return Err(Error::Misuse(
                "introductions are between this vat's peers: pass the capability directly",
            ));
        }
        let expires_at = SystemTime::now() + self.inner.options.introduction_lifetime;
        let request = ThirdPartyToAwait::new(*recipient, random_nonce(), expires_at)?;
        let mut addresses = self.provide(cap, provider, &request).await?;
        for known in self.addresses(provider) {
            if addresses.len() < MAX_ADDRESSES && !addresses.contains(&known) {
                addresses.push(known);
            }
        }
        addresses.truncate(MAX_ADDRESSES);
        Introduction::new(
            &self.inner.identity,
            *provider,
            addresses,
            *recipient,
            *request.nonce(),
            expires_at,
        )
    }

    /// Withdraws a handoff this vat asked `provider` for: a later (or waiting)
    /// redeem fails with [`IntroductionError::Revoked`]. A capability already
    /// redeemed is not affected.
    ///
    /// # Errors
    /// The errors of [`Network::connect`]; [`Error::Rpc`] if the call fails.
    pub async fn withdraw(&self, provider: &VatId, nonce: &Nonce) -> Result<()> {
        let root = self.root(provider).await?;
        let mut call = root.withdraw_request();
        call.get().set_nonce(nonce);
        tokio::time::timeout(self.inner.options.connect_timeout, call.send().promise)
            .await
            .map_err(|_| Error::Introduction(IntroductionError::Timeout))?
            .map_err(|e| rpc_failure("call Vat.withdraw", e))?;
        Ok(())
    }

    /// Alice's side of an introduction: checks it (the introducer's
    /// signature, the expiry, that it is for this vat), connects straight to
    /// its provider (pinned to the provider's VatId, at the addresses known
    /// for it, then at those the introduction names: these are the
    /// introducer's word, used for this redeem only, and one is kept in the
    /// address book only if the connection succeeded through it), presents
    /// it, and returns the capability. Calls on it go to the provider
    /// directly.
    ///
    /// # Errors
    /// [`Error::Introduction`]: the local check's refusal, or the
    /// provider's (`Replayed`, `Revoked`, `Timeout` when the introducer's
    /// request never came or the provider restarted, ...), or `Timeout`
    /// after [`NetworkConfig::redeem_timeout`](super::NetworkConfig::redeem_timeout); the errors of
    /// [`Network::connect`]; [`Error::Rpc`] if the call fails.
    pub async fn redeem<C: FromClientHook>(&self, introduction: &Introduction) -> Result<C> {
        introduction.verify(&self.inner.vat_id, SystemTime::now())?;
        let provider = *introduction.provider();
        if provider == self.inner.vat_id {
            return Err(Error::Misuse(
                "this vat is the introduction's provider: nothing to redeem elsewhere",
            ));
        }
        // The hints are the introducer's word: used for this redeem only,
        // after the addresses known for the provider, and kept only if a
        // connection pinned to the provider succeeds through one.
        let hints = introduction.provider_addresses();
        let mut retried = false;
        let reply = loop {
            let conn = self.inner.live_via(&provider, hints).await?;
            let mut call = conn.root.accept_request();
            introduction
                .write_to(call.get().init_completion().init_contact())
                .map_err(|e| rpc_failure("call Vat.accept", e))?;
            let reply =
                tokio::time::timeout(self.inner.options.redeem_timeout, call.send().promise)
                    .await
                    .map_err(|_| Error::Introduction(IntroductionError::Timeout))?;
            match reply {
                // A connection that ended before we noticed (the provider
                // restarted): forget it and present the introduction once
                // more over a new one. Safe: the provider allows one use.
                Err(e) if e.kind == capnp::ErrorKind::Disconnected && !retried => {
                    retried = true;
                    self.inner.close(&conn);
                }
                other => break other.map_err(|e| rpc_failure("call Vat.accept", e))?,
            }
        };
        let reply = reply.get().map_err(|e| rpc_failure("call Vat.accept", e))?;
        service::check(reply.get_error(), reply.get_reason())?;
        let cap: capnp::capability::Client = reply
            .get_cap()
            .get_as_capability()
            .map_err(|e| rpc_failure("call Vat.accept", e))?;
        Ok(C::new(cap.hook))
    }
}
