//! Thin gRPC adapters, one per service of the contract: validate, convert protobuf to domain
//! types, call the domain, convert back, and map errors through [`crate::error`].
//!
//! RPCs that this build does not serve yet keep the generated default, which answers
//! `UNIMPLEMENTED`.

pub mod codec;
pub mod convert;
pub mod customers;
pub mod deadline;
pub mod deliveries;
pub mod events;
pub mod feedback;
pub mod paging;
pub mod rules;
pub mod surveys;
pub mod validate;
pub mod writes;

pub use customers::CustomerApi;
pub use deliveries::DeliveryApi;
pub use events::EventApi;
pub use feedback::FeedbackApi;
pub use surveys::SurveyApi;

/// Full gRPC method names of the write RPCs, as `Delivery.method` reports them.
pub mod methods {
    pub const UPSERT_CUSTOMERS: &str = "/cx.gateway.v1.CustomerService/UpsertCustomers";
    pub const DELETE_CUSTOMERS: &str = "/cx.gateway.v1.CustomerService/DeleteCustomers";
    pub const UNSUBSCRIBE_CUSTOMERS: &str = "/cx.gateway.v1.CustomerService/UnsubscribeCustomers";
    pub const RESUBSCRIBE_CUSTOMERS: &str = "/cx.gateway.v1.CustomerService/ResubscribeCustomers";
    pub const UPSERT_CUSTOMER_ARRAY_ITEMS: &str =
        "/cx.gateway.v1.CustomerService/UpsertCustomerArrayItems";
    pub const DELETE_CUSTOMER_ARRAY_ITEMS: &str =
        "/cx.gateway.v1.CustomerService/DeleteCustomerArrayItems";
    pub const SEND_SURVEY: &str = "/cx.gateway.v1.SurveyService/SendSurvey";
    pub const SET_FEEDBACK_TAGS: &str = "/cx.gateway.v1.SurveyService/SetFeedbackTags";
    pub const SET_FEEDBACK_TOPICS: &str = "/cx.gateway.v1.SurveyService/SetFeedbackTopics";
    pub const TRACK_EVENT: &str = "/cx.gateway.v1.EventService/TrackEvent";
    pub const TRACK_EVENTS: &str = "/cx.gateway.v1.EventService/TrackEvents";

    pub const WRITES: [&str; 11] = [
        UPSERT_CUSTOMERS,
        DELETE_CUSTOMERS,
        UNSUBSCRIBE_CUSTOMERS,
        RESUBSCRIBE_CUSTOMERS,
        UPSERT_CUSTOMER_ARRAY_ITEMS,
        DELETE_CUSTOMER_ARRAY_ITEMS,
        SEND_SURVEY,
        SET_FEEDBACK_TAGS,
        SET_FEEDBACK_TOPICS,
        TRACK_EVENT,
        TRACK_EVENTS,
    ];
}
