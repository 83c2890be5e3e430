//! # azure: a disk in an Azure Blob Storage container
//!
//! Serves one blob read-only, or a read-write disk stored as one blob per
//! chunk, from Azure Blob Storage or the Azurite emulator, in the same
//! layout as the `S3` plugin (chunks named `KEY/%016x`), with the same
//! write-back cache, parallel requests and retries (see
//! [`crate::objstore`]). Upstream nbdkit has no Azure plugin; the
//! parameters follow the `S3` plugin's and Azure's own names.
//!
//! ```text
//! nbdkit azure account=myaccount container=images key=disk.img
//! nbdkit azure account=myaccount container=images key=disk size=50G object-size=8M
//! nbdkit azure use-emulator=true container=images key=disk size=1G object-size=4M
//! ```
//!
//! ## Parameters
//!
//! - `container=NAME` (required): the container.
//! - `key=STRING` (required), `size=SIZE`, `object-size=SIZE`,
//!   `cache-max=SIZE`: the blob or the chunked disk, as the `S3` plugin's.
//! - `account=NAME`: the storage account (default
//!   `$AZURE_STORAGE_ACCOUNT_NAME`, else `$AZURE_STORAGE_ACCOUNT`).
//! - `access-key=KEY`: the account's shared key (default
//!   `$AZURE_STORAGE_ACCOUNT_KEY`, else `$AZURE_STORAGE_KEY`).
//! - `sas-token=TOKEN`: a shared access signature instead of the key
//!   (default `$AZURE_STORAGE_SAS_TOKEN`).
//! - `endpoint-url=URL`: the account's blob endpoint (default
//!   `https://ACCOUNT.blob.core.windows.net`; `http://` is allowed, for
//!   emulators).
//! - `use-emulator=true`: Azurite's defaults: account `devstoreaccount1`,
//!   its well-known key and `http://127.0.0.1:10000/devstoreaccount1`;
//!   any of them can still be given.
//!
//! Without a key or a SAS token the plugin refuses to start rather than
//! wait for a managed-identity service.

use std::sync::Arc;

use libnbd::{ConfigError, ConfigResult, Params, Plugin, PluginEntry};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::RetryConfig;

use crate::objstore;

/// The registry entry of the azure plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "azure",
    help: "\
container=NAME          The container (required).
key=STRING              The blob, or the prefix of the chunk blobs (required).
size=SIZE               The size of a chunked read-write disk (with object-size).
object-size=SIZE        The size of each chunk blob (with size).
account=NAME            The storage account.
access-key=KEY          The account's shared key.
sas-token=TOKEN         A shared access signature.
endpoint-url=URL        The blob endpoint (default https://ACCOUNT.blob.core.windows.net).
use-emulator=true       Azurite's account, key and address.
cache-max=SIZE          The largest write-back cache (default 256M).",
    magic: None,
    create,
};

/// Azurite's account and its published, well-known key.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Build the plugin from its parameters.
pub fn create(p: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let container = p
        .take("container")
        .ok_or_else(|| ConfigError::new("azure: the container parameter is required"))?;
    let disk = objstore::take_disk(p, "azure")?;
    let emulator = p.take_bool("use-emulator")?.unwrap_or(false);
    let env = |names: &[&str]| {
        names
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    };
    let account = p
        .take("account")
        .or_else(|| env(&["AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"]))
        .or_else(|| emulator.then(|| EMULATOR_ACCOUNT.to_string()))
        .ok_or_else(|| {
            ConfigError::new(
                "azure: no storage account: give account= or set AZURE_STORAGE_ACCOUNT_NAME",
            )
        })?;
    let key = p
        .take("access-key")
        .or_else(|| env(&["AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY"]));
    let sas = p
        .take("sas-token")
        .or_else(|| env(&["AZURE_STORAGE_SAS_TOKEN"]));
    let key = match (key, sas.is_some(), emulator) {
        (Some(k), _, _) => Some(k),
        (None, true, _) => None,
        (None, false, true) => Some(EMULATOR_KEY.to_string()),
        (None, false, false) => {
            return Err(ConfigError::new(
                "azure: no credentials: give access-key= or sas-token=, or set \
                 AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN",
            ))
        }
    };
    let endpoint = p
        .take("endpoint-url")
        .or_else(|| emulator.then(|| format!("http://127.0.0.1:10000/{account}")));

    let mut b = MicrosoftAzureBuilder::new()
        .with_account(&account)
        .with_container_name(&container)
        .with_retry(RetryConfig::default());
    if let Some(k) = key {
        b = b.with_access_key(k);
    }
    if let Some(s) = sas {
        b = b.with_config(AzureConfigKey::SasKey, s.trim_start_matches('?'));
    }
    if let Some(e) = endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(ConfigError::new(format!(
                "azure: endpoint-url must start with http:// or https://, not '{e}'"
            )));
        }
        b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
    }
    let store = b
        .build()
        .map_err(|e| ConfigError::new(format!("azure: cannot configure the store: {e}")))?;
    Ok(objstore::plugin("azure", Arc::new(store), container, disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let bad = |w: &[&str]| {
            let mut p = Params::parse(w, None).unwrap();
            ENTRY.configure(&mut p).err().map(|e| e.0)
        };
        let emu = |extra: &[&str]| {
            let mut v = vec!["use-emulator=true"];
            v.extend_from_slice(extra);
            bad(&v)
        };
        assert!(emu(&["key=k"]).unwrap().contains("container"));
        assert!(emu(&["container=c"]).unwrap().contains("key"));
        assert!(emu(&["container=c", "key=k", "size=1M"])
            .unwrap()
            .contains("together"));
        assert!(emu(&["container=c", "key=k", "endpoint-url=ftp://x"])
            .unwrap()
            .contains("endpoint-url"));
        assert!(emu(&["container=c", "key=k", "size=1M", "object-size=64k"]).is_none());
        assert!(emu(&["container=c", "key=k"]).is_none());
        assert!(bad(&["container=c", "key=k", "account=a", "sas-token=sv=1&sig=x"]).is_none());
    }
}
