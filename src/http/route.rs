//! The routes as metrics and traces name them: one spelling per route, the path it is served at.

/// A route of the API, the value of the `route` label of every metric that has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Sentiment,
    Generate,
    Tokenize,
    Decode,
    Completions,
    ChatCompletions,
    Models,
    Info,
    Health,
    Ready,
    Metrics,
    OpenApi,
    Playground,
    Docs,
    Adapters,
    Adapter,
    Predict,
    Classify,
    Score,
    Ping,
    Invocations,
    TgiGenerate,
    TgiGenerateStream,
    /// A path no route serves.
    Unmatched,
}

impl Route {
    pub const ALL: [Self; 24] = [
        Self::Sentiment,
        Self::Generate,
        Self::Tokenize,
        Self::Decode,
        Self::Completions,
        Self::ChatCompletions,
        Self::Models,
        Self::Info,
        Self::Health,
        Self::Ready,
        Self::Metrics,
        Self::OpenApi,
        Self::Playground,
        Self::Docs,
        Self::Adapters,
        Self::Adapter,
        Self::Predict,
        Self::Classify,
        Self::Score,
        Self::Ping,
        Self::Invocations,
        Self::TgiGenerate,
        Self::TgiGenerateStream,
        Self::Unmatched,
    ];

    /// The label value: the path the route is served at.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sentiment => "/v1/sentiment",
            Self::Generate => "/v1/generate",
            Self::Tokenize => "/tokenize",
            Self::Decode => "/decode",
            Self::Completions => "/v1/completions",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Models => "/v1/models",
            Self::Info => "/info",
            Self::Health => "/health",
            Self::Ready => "/ready",
            Self::Metrics => "/metrics",
            Self::OpenApi => "/openapi.json",
            Self::Playground => "/",
            Self::Docs => "/docs",
            Self::Adapters => "/v1/adapters",
            Self::Adapter => "/v1/adapters/{name}",
            Self::Predict => "/predict",
            Self::Classify => "/classify",
            Self::Score => "/score",
            Self::Ping => "/ping",
            Self::Invocations => "/invocations",
            Self::TgiGenerate => "/generate",
            Self::TgiGenerateStream => "/generate_stream",
            Self::Unmatched => "unmatched",
        }
    }

    /// The route of a matched path (axum's `MatchedPath`); the Swagger UI's paths are all `Docs`.
    pub fn of_path(path: Option<&str>) -> Self {
        let Some(path) = path else {
            return Self::Unmatched;
        };
        if path.starts_with("/docs") {
            return Self::Docs;
        }
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == path)
            .unwrap_or(Self::Unmatched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_one_spelling_and_is_found_by_it() {
        let labels: std::collections::BTreeSet<_> = Route::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Route::ALL.len());
        for r in Route::ALL.into_iter().filter(|r| *r != Route::Unmatched) {
            assert_eq!(Route::of_path(Some(r.as_str())), r);
        }
        assert_eq!(Route::of_path(Some("/docs/{*rest}")), Route::Docs);
        assert_eq!(Route::of_path(None), Route::Unmatched);
    }
}
