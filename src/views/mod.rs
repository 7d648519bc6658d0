//! Views: a stream's document with its entities filtered (equality filters over configured
//! aliases, RFC 9535 filter expressions) and projected (some fields of each entity), served as
//! a stream of its own wherever a stream is served, and computed once per distinct view.
//!
//! - [`spec`]: what a view is as written (query string or configuration), canonicalized.
//! - [`select`]: how a view selects and projects (pure).
//! - [`config`]: `[streams.filtering]`, `[[streams.views]]`, `[views]`.
//! - [`set`]: the views of one stream, derived incrementally from its changes.
//! - [`document`]: a view's document, built only when someone needs it.
//!
//! A view of stream `s` is named `s@{view}` (`view` a configured name, or `~` and 12 hex
//! digits of the ad hoc spec's canonical form): its event ids are `s@{view}:{epoch}:{seq}`
//! with the epoch and sequence number of the source's change at which the view changed, so
//! every node of a cluster computes the same ids from the same log.

pub mod config;
pub mod document;
pub mod select;
pub mod set;
pub mod spec;

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::hub::{Hub, Resume, Stream, Subscription};
pub use set::{Budget, StreamViews};
pub use spec::{Asked, ViewError};

/// The views of every stream that has them (changed by a configuration reload).
#[derive(Default)]
pub struct Views {
    streams: RwLock<HashMap<String, Arc<StreamViews>>>,
}

/// What a request for a stream's document or events names.
pub enum Target {
    /// The stream itself.
    Whole(Arc<Stream>),
    /// One of its views: the source stream, its views, and the view's id and spec.
    View(Arc<Stream>, Arc<StreamViews>, Arc<str>, spec::ViewSpec),
}

impl Views {
    /// No views.
    pub fn new() -> Self {
        Self::default()
    }

    /// Derives `views` from `stream` from now on.
    pub fn attach(&self, stream: &Arc<Stream>, views: StreamViews) {
        let views = Arc::new(views);
        if stream.derive(views.clone()) {
            self.write().insert(stream.name().to_owned(), views);
        }
    }

    /// Replaces the views of `stream` with `views` (none: the stream has no views any more),
    /// a reload having changed them: the old views' streams end, their subscribers come back
    /// to the new ones.
    pub fn replace(&self, stream: &Arc<Stream>, views: Option<StreamViews>) {
        let views = views.map(Arc::new);
        let derivation = views.clone().map(|v| v as Arc<dyn crate::hub::Derivation>);
        let old = stream.rederive(derivation);
        match views {
            Some(views) => self.write().insert(stream.name().to_owned(), views),
            None => self.write().remove(stream.name()),
        };
        if let Some(old) = old {
            old.closed();
        }
    }

    /// Forgets the views of stream `name` (a reload removed the stream; ending it ended them).
    pub fn forget(&self, name: &str) {
        self.write().remove(name);
    }

    /// The views of stream `name`, if it has any.
    pub fn of(&self, name: &str) -> Option<Arc<StreamViews>> {
        self.read().get(name).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<StreamViews>>> {
        // Writers replace whole entries: a poisoned map is still consistent.
        self.streams.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<StreamViews>>> {
        self.streams.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `name` (a stream, or `stream@view`) with `query` asks for, among `hub`'s streams.
    /// `None`: no such stream. A view that cannot be had is the error.
    pub fn target(
        &self,
        hub: &Hub,
        name: &str,
        query: Option<&str>,
    ) -> Option<Result<Target, ViewError>> {
        if let Some(stream) = hub.get(name) {
            return Some(self.asked(stream, query));
        }
        let (source, id) = name.split_once('@')?;
        let stream = hub.get(source)?;
        let Some(views) = self.of(source) else {
            return Some(Err(ViewError::NoViews(source.to_owned())));
        };
        // Only the subscription's own parameters (a resume id, a token) may follow a view's
        // name: `stream@view?route=…` is one view at a time, refused rather than half obeyed.
        match spec::parse_query(query, &views.aliases()) {
            Ok(Asked::Whole) => {}
            Ok(_) => return Some(Err(ViewError::Combined(format!("`{name}`")))),
            Err(error) => return Some(Err(error)),
        }
        Some(
            views
                .by_id(id)
                .map(|(id, spec)| Target::View(stream, views, id, spec)),
        )
    }

    /// What `query` asks of `stream`: the stream itself or one of its views.
    fn asked(&self, stream: Arc<Stream>, query: Option<&str>) -> Result<Target, ViewError> {
        let Some(views) = self.of(stream.name()) else {
            // A stream without views ignores parameters it does not know, but a view asked of
            // it is refused rather than silently served whole.
            if let Some(query) = query {
                for pair in query.split('&') {
                    let name = pair.split_once('=').map_or(pair, |(n, _)| n);
                    if matches!(name, "view" | "where" | "fields") {
                        return Err(ViewError::NoViews(stream.name().to_owned()));
                    }
                }
            }
            return Ok(Target::Whole(stream));
        };
        let asked = spec::parse_query(query, &views.aliases())?;
        Ok(match views.resolve(asked)? {
            None => Target::Whole(stream),
            Some((id, spec)) => Target::View(stream, views, id, spec),
        })
    }
}

impl Target {
    /// Subscribes from `resume`.
    pub fn subscribe(&self, resume: &Resume) -> Result<Subscription, ViewError> {
        match self {
            Target::Whole(stream) => Ok(stream.subscribe(resume)),
            Target::View(source, views, id, spec) => {
                views.subscribe(source, id.clone(), spec.clone(), resume)
            }
        }
    }

    /// The stream whose document is served (the view's, created if needed).
    pub fn stream(&self) -> Result<Arc<Stream>, ViewError> {
        match self {
            Target::Whole(stream) => Ok(stream.clone()),
            Target::View(source, views, id, spec) => views.stream(source, id.clone(), spec.clone()),
        }
    }
}
