//! The product table: each product's status mode and its current script,
//! swapped atomically when a script is (re)loaded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use super::{Script, ScriptEngine, ScriptSettings};
use crate::config::Config;
use crate::status::StatusMode;

/// A product as the pipeline sees it.
#[derive(Debug, Clone)]
pub struct Product {
    /// Its name.
    pub name: String,
    /// Its status mode (a registered device may override it).
    pub mode: StatusMode,
    /// Which other devices its outputs may write.
    pub children: crate::config::Children,
    /// The script file.
    pub path: PathBuf,
    /// The running script; `None` when none could be loaded.
    pub script: Option<Script>,
    /// Why the last load failed, if it did.
    pub error: Option<String>,
    /// When the last load was attempted.
    pub checked_at: SystemTime,
    /// How many times a new version took over by hot reload.
    pub reloads: u64,
    /// How many changed files hot reload refused.
    pub rejected: u64,
    /// How many times hot reload compiled and validated a changed file
    /// (whether it took over or was refused).
    pub validations: u64,
}

/// Every product, swapped as a whole so readers never lock.
#[derive(Debug, Default)]
pub struct ScriptRegistry {
    products: ArcSwap<HashMap<String, Arc<Product>>>,
}

impl ScriptRegistry {
    /// Loads the script of every configured product and of every
    /// `<product>.wasm` in the scripts directory. A script that fails to
    /// load leaves its product without one (its messages are dead-lettered)
    /// and the reason in [`Product::error`].
    pub fn load(engine: &ScriptEngine, config: &Config) -> Self {
        let mut names: Vec<String> = config.products.keys().cloned().collect();
        if let Ok(entries) = std::fs::read_dir(&config.scripts.dir) {
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "wasm")
                    && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
                    && crate::config::check_name(stem).is_ok()
                    && !names.iter().any(|n| n == stem)
                {
                    names.push(stem.to_owned());
                }
            }
        }
        let registry = ScriptRegistry::default();
        for name in names {
            registry.put(load_product(engine, config, &name));
        }
        registry
    }

    /// The product called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Product>> {
        self.products.load().get(name).cloned()
    }

    /// The names of the products that have a script running, sorted.
    pub fn loaded_products(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .products
            .load()
            .values()
            .filter(|p| p.script.is_some())
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Every product.
    pub fn list(&self) -> Vec<Arc<Product>> {
        let mut products: Vec<_> = self.products.load().values().cloned().collect();
        products.sort_by(|a, b| a.name.cmp(&b.name));
        products
    }

    /// Adds or replaces a product.
    pub fn put(&self, product: Product) {
        let product = Arc::new(product);
        self.products.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(product.name.clone(), product.clone());
            next
        });
    }

    /// Removes a product.
    pub fn remove(&self, name: &str) {
        self.products.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.remove(name);
            next
        });
    }
}

/// Loads `name`'s script as the configuration says.
pub fn load_product(engine: &ScriptEngine, config: &Config, name: &str) -> Product {
    let mut product = Product::configured(config, name);
    match engine.load_file(name, &product.path, settings_of(config, name)) {
        Ok(script) => {
            tracing::info!(product = name, version = %script.id().version, cache = ?script.info().cache, "script loaded");
            product.script = Some(script);
        }
        Err(error) => {
            tracing::error!(product = name, %error, "script did not load; its messages go to dead letters");
            product.error = Some(error.to_string());
        }
    }
    product
}

/// The script settings of `product` from the configuration.
pub fn settings_of(config: &Config, product: &str) -> ScriptSettings {
    let settings = config.products.get(product);
    ScriptSettings {
        limits: settings.map(|p| p.limits.clone()).unwrap_or_default(),
        params: settings.map(|p| p.params.clone()).unwrap_or_default(),
    }
}

impl Product {
    /// `name` as configured, with no script yet.
    pub fn configured(config: &Config, name: &str) -> Product {
        Product {
            name: name.to_owned(),
            mode: config
                .products
                .get(name)
                .map(|p| p.status)
                .unwrap_or_default(),
            children: config
                .products
                .get(name)
                .map(|p| p.children)
                .unwrap_or_default(),
            path: config.script_path(name),
            script: None,
            error: None,
            checked_at: SystemTime::now(),
            reloads: 0,
            rejected: 0,
            validations: 0,
        }
    }
}
