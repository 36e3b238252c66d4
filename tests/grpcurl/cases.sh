# grpcurl cases, sourced by run.sh: `case_ NAME EXIT PATTERN... -- ARGS...` ($addr is the gateway).

case_ "list shows every service, health and reflection" 0 \
  '^cx\.gateway\.v1\.CustomerService$' '^cx\.gateway\.v1\.SurveyService$' \
  '^cx\.gateway\.v1\.EventService$' '^cx\.gateway\.v1\.FeedbackStream$' \
  '^cx\.gateway\.v1\.DeliveryService$' '^grpc\.health\.v1\.Health$' \
  '^grpc\.reflection\.v1alpha\.ServerReflection$' -- "$addr" list

for service in CustomerService SurveyService EventService FeedbackStream DeliveryService; do
  case_ "describe $service" 0 "service $service" -- "$addr" describe "cx.gateway.v1.$service"
done

case_ "overall health is SERVING" 0 '"status": "SERVING"' -- \
  -d '{"service": ""}' "$addr" grpc.health.v1.Health/Check
case_ "per-service health is SERVING" 0 '"status": "SERVING"' -- \
  -d '{"service": "cx.gateway.v1.SurveyService"}' "$addr" grpc.health.v1.Health/Check

# DeliveryService
case_ "ListDeadLetters starts empty" 0 '"totalSize": "0"' -- \
  -d '{"page_size": 10}' "$addr" cx.gateway.v1.DeliveryService/ListDeadLetters
case_ "GetDelivery of an unknown id is NOT_FOUND" 69 'Code: NotFound' 'DELIVERY_NOT_FOUND' -- \
  -d '{"delivery_id": "dlv_unknown"}' "$addr" cx.gateway.v1.DeliveryService/GetDelivery
case_ "RetryDeadLetters with bad input is INVALID_ARGUMENT with field violations" 67 \
  'Code: InvalidArgument' 'INVALID_FIELDS' '"field":"delivery_ids\[1\]"' -- \
  -d '{"delivery_ids": ["dlv_a", "dlv_a"]}' "$addr" cx.gateway.v1.DeliveryService/RetryDeadLetters

# EventService
case_ "ListEventMappings answers (none configured by default)" 0 '"totalSize": "0"' -- \
  -d '{}' "$addr" cx.gateway.v1.EventService/ListEventMappings
case_ "TrackEvent records an event at Retainly" 0 '"duplicate": false' -- \
  -d '{"event": {"customer_id": "grpcurl-1", "name": "grpcurl_event", "message_id": "grpcurl-msg-1"}}' \
  "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvent with the same message id is a duplicate" 0 '"duplicate": true' -- \
  -d '{"event": {"customer_id": "grpcurl-1", "name": "grpcurl_event", "message_id": "grpcurl-msg-1"}}' \
  "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvent with bad input names the fields" 67 'INVALID_FIELDS' '"field":"event.customer_id"' \
  '"field":"event.name"' -- -d '{"event": {"name": ""}}' "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvent with a control character in the name or a key is INVALID_ARGUMENT" 67 \
  'INVALID_FIELDS' '"field":"event.name"' '"field":"event.properties"' -- \
  -d '{"event": {"customer_id": "grpcurl-1", "name": "sign\u0000ed_up", "properties": {"": 1}}}' \
  "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvents (client stream) counts events" 0 '"acceptedCount": "2"' -- \
  -d '{"events": [{"customer_id": "g2", "name": "bulk"}]} {"events": [{"customer_id": "g3", "name": "bulk"}]}' \
  "$addr" cx.gateway.v1.EventService/TrackEvents

# CustomerService
customers='{"customers": [{"customer_id": "gc-1", "email": "Ann@grpcurl-demo.com", "first_name": "Ann",
  "company": "Grpcurl Demo", "tags": ["vip"], "properties": [{"name": "plan", "value": {"string_value": "pro"}},
  {"name": "seats", "value": {"integer_value": "12"}}]}], "destinations": ["DESTINATION_RETENTLY", "DESTINATION_RETAINLY"]}'
case_ "UpsertCustomers writes both destinations" 0 '"outcome": "WRITE_OUTCOME_CREATED"' \
  '"outcome": "WRITE_OUTCOME_APPLIED"' '"retentlyId": "[0-9a-f]{24}"' -- \
  -d "$customers" "$addr" cx.gateway.v1.CustomerService/UpsertCustomers
case_ "UpsertCustomers ASYNC answers with a delivery id" 0 '"deliveryId": "dlv_[0-9a-f]{32}"' -- \
  -d '{"customers": [{"customer_id": "gc-2"}], "destinations": ["DESTINATION_RETAINLY"],
  "options": {"mode": "DELIVERY_MODE_ASYNC"}}' "$addr" cx.gateway.v1.CustomerService/UpsertCustomers
case_ "UpsertCustomers with bad input names the field" 67 'Code: InvalidArgument' \
  '"field":"customers\[0\]\.email"' -- \
  -d '{"customers": [{"email": "not-an-address"}], "destinations": ["DESTINATION_RETENTLY"]}' \
  "$addr" cx.gateway.v1.CustomerService/UpsertCustomers
case_ "GetCustomer by email reads typed properties" 0 '"email": "ann@grpcurl-demo.com"' \
  '"integerValue": "12"' -- \
  -d '{"email": "ann@grpcurl-demo.com"}' "$addr" cx.gateway.v1.CustomerService/GetCustomer
case_ "GetCustomer of an unknown id is NOT_FOUND" 69 'Code: NotFound' 'UPSTREAM_NOT_FOUND' -- \
  -d '{"retently_id": "0123456789abcdef01234567"}' "$addr" cx.gateway.v1.CustomerService/GetCustomer
case_ "ListCustomers pages newest first" 0 '"nextPageToken": "[A-Za-z0-9_-]+"' '"totalSize": "20[01]"' -- \
  -d '{"page_size": 2}' "$addr" cx.gateway.v1.CustomerService/ListCustomers
case_ "UnsubscribeCustomers opts out at Retently" 0 '"outcome": "WRITE_OUTCOME_APPLIED"' -- \
  -d '{"emails": ["ann@grpcurl-demo.com"], "message": "asked by phone"}' \
  "$addr" cx.gateway.v1.CustomerService/UnsubscribeCustomers
case_ "ResubscribeCustomers opts back in" 0 '"outcome": "WRITE_OUTCOME_APPLIED"' -- \
  -d '{"emails": ["ann@grpcurl-demo.com"]}' "$addr" cx.gateway.v1.CustomerService/ResubscribeCustomers
case_ "UpsertCustomerArrayItems adds items" 0 '"field": "purchases"' '"outcome": "WRITE_OUTCOME_APPLIED"' -- \
  -d '{"records": [{"customer_id": "gc-1", "field": "purchases",
  "items": [{"item_id": "p1", "fields": {"amount": 12, "products": [{"name": "apple"}]}}]}]}' \
  "$addr" cx.gateway.v1.CustomerService/UpsertCustomerArrayItems
case_ "DeleteCustomerArrayItems removes items by id" 0 '"outcome": "WRITE_OUTCOME_APPLIED"' -- \
  -d '{"records": [{"customer_id": "gc-1", "field": "purchases", "item_ids": ["p1"]}]}' \
  "$addr" cx.gateway.v1.CustomerService/DeleteCustomerArrayItems
case_ "ListCompanies pages newest first" 0 '"companyId": "[0-9a-f]{24}"' '"nextPageToken": "[A-Za-z0-9_-]+"' -- \
  -d '{"page_size": 3}' "$addr" cx.gateway.v1.CustomerService/ListCompanies
case_ "GetCompany by domain" 0 '"name": "Grpcurl Demo"' '"domain": "grpcurl-demo.com"' -- \
  -d '{"domain": "GRPCURL-DEMO.com"}' "$addr" cx.gateway.v1.CustomerService/GetCompany
case_ "DeleteCustomers deletes at both destinations" 0 '"destination": "DESTINATION_RETENTLY"' \
  '"destination": "DESTINATION_RETAINLY"' '"outcome": "WRITE_OUTCOME_APPLIED"' -- \
  -d '{"customers": [{"customer_id": "gc-1", "email": "ann@grpcurl-demo.com"}],
  "destinations": ["DESTINATION_RETENTLY", "DESTINATION_RETAINLY"]}' \
  "$addr" cx.gateway.v1.CustomerService/DeleteCustomers


# SurveyService
# `json_field PATH...` prints one field of the JSON grpcurl printed, for ids later cases need.
json_field() {
  python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[int(key)] if key.isdigit() else value[key]
print(value)' "$@"
}
survey() { grpcurl -plaintext -emit-defaults -d "$1" "$addr" "cx.gateway.v1.SurveyService/$2"; }

case_ "ListCampaigns filters by type and state" 0 '"campaignId": "[0-9a-f]{24}"' \
  '"type": "CAMPAIGN_TYPE_TRANSACTIONAL"' '"active": true' '"totalSize": "[1-9]' -- \
  -d '{"type": "CAMPAIGN_TYPE_TRANSACTIONAL", "active": true}' "$addr" \
  cx.gateway.v1.SurveyService/ListCampaigns
campaign_id=$(survey '{"type": "CAMPAIGN_TYPE_TRANSACTIONAL", "active": true, "metric": "METRIC_NPS"}' \
  ListCampaigns | json_field campaigns 0 campaignId)
case_ "SendSurvey schedules each recipient" 0 '"outcome": "RECIPIENT_OUTCOME_SCHEDULED"' \
  '"email": "ann@example.com"' -- \
  -d "{\"campaign_id\": \"$campaign_id\", \"recipients\": [{\"email\": \"ann@example.com\", \"first_name\": \"Ann\"}], \"delay_days\": 2}" \
  "$addr" cx.gateway.v1.SurveyService/SendSurvey
case_ "SendSurvey in ASYNC mode answers with a delivery id" 0 '"deliveryId": "dlv_' -- \
  -d "{\"campaign_id\": \"$campaign_id\", \"recipients\": [{\"email\": \"bob@example.com\"}], \"options\": {\"mode\": \"DELIVERY_MODE_ASYNC\"}}" \
  "$addr" cx.gateway.v1.SurveyService/SendSurvey
case_ "SendSurvey to an unknown campaign is NOT_FOUND" 69 'Code: NotFound' 'CAMPAIGN_NOT_FOUND' -- \
  -d '{"campaign_id": "0123456789abcdef01234567", "recipients": [{"email": "cy@example.com"}]}' \
  "$addr" cx.gateway.v1.SurveyService/SendSurvey
case_ "SendSurvey with bad input is INVALID_ARGUMENT with field violations" 67 \
  'Code: InvalidArgument' '"field":"recipients\[1\].email"' '"field":"delay_days"' -- \
  -d "{\"campaign_id\": \"$campaign_id\", \"recipients\": [{\"email\": \"a@example.com\"}, {\"email\": \"nope\"}], \"delay_days\": 400}" \
  "$addr" cx.gateway.v1.SurveyService/SendSurvey
case_ "ListTemplates lists templates" 0 '"templateId": "[0-9a-f]{24}"' '"metric": "METRIC_' -- \
  -d '{"page_size": 5}' "$addr" cx.gateway.v1.SurveyService/ListTemplates
template_id=$(survey '{"page_size": 1}' ListTemplates | json_field templates 0 templateId)
case_ "GetTemplate reads one template" 0 "\"templateId\": \"$template_id\"" -- \
  -d "{\"template_id\": \"$template_id\"}" "$addr" cx.gateway.v1.SurveyService/GetTemplate
case_ "GetTemplate of an unknown id is NOT_FOUND" 69 'Code: NotFound' 'UPSTREAM_NOT_FOUND' -- \
  -d '{"template_id": "0123456789abcdef01234567"}' "$addr" cx.gateway.v1.SurveyService/GetTemplate
case_ "GetTemplate of an id of the wrong shape is INVALID_ARGUMENT" 67 'INVALID_FIELDS' \
  '"field":"template_id"' -- -d '{"template_id": "../campaigns"}' "$addr" cx.gateway.v1.SurveyService/GetTemplate
case_ "GetScore reads the NPS" 0 '"metric": "METRIC_NPS"' '"totalResponses": "[1-9]' '"fetchTime": "' -- \
  -d '{"metric": "METRIC_NPS"}' "$addr" cx.gateway.v1.SurveyService/GetScore
case_ "GetScore without a metric is INVALID_ARGUMENT" 67 '"field":"metric"' -- \
  -d '{}' "$addr" cx.gateway.v1.SurveyService/GetScore
case_ "ListFeedback pages responses newest first" 0 '"feedbackId": "[0-9a-f]{24}"' \
  '"scoreCategory": "SCORE_CATEGORY_' '"nextPageToken": "[^"]+"' '"source": "FEEDBACK_LIST_SOURCE_UPSTREAM"' -- \
  -d "{\"page_size\": 2, \"campaign_id\": \"$campaign_id\"}" "$addr" cx.gateway.v1.SurveyService/ListFeedback
feedback_id=$(survey '{"page_size": 1}' ListFeedback | json_field feedback 0 feedbackId)
feedback_email=$(survey '{"page_size": 1}' ListFeedback | json_field feedback 0 email)
case_ "GetCustomerFeedbackHistory answers from the log by email" 0 '"totalSize": "[0-9]+"' \
  '"summaries": \[' -- -d "{\"email\": \"$feedback_email\", \"page_size\": 5}" \
  "$addr" cx.gateway.v1.SurveyService/GetCustomerFeedbackHistory
case_ "GetCustomerFeedbackHistory without a customer is INVALID_ARGUMENT" 67 'INVALID_FIELDS' \
  '"field":"email"' -- -d '{}' "$addr" cx.gateway.v1.SurveyService/GetCustomerFeedbackHistory
case_ "GetCustomerFeedbackHistory with a forged page token is INVALID_ARGUMENT" 67 \
  '"field":"page_token"' -- -d "{\"email\": \"$feedback_email\", \"page_token\": \"Zm9yZ2Vk\"}" \
  "$addr" cx.gateway.v1.SurveyService/GetCustomerFeedbackHistory
case_ "GetFeedback reads one response" 0 "\"feedbackId\": \"$feedback_id\"" '"createTime": "' -- \
  -d "{\"feedback_id\": \"$feedback_id\"}" "$addr" cx.gateway.v1.SurveyService/GetFeedback
case_ "SetFeedbackTags replaces the tags" 0 '"deliveryId": ""' -- \
  -d "{\"feedback_id\": \"$feedback_id\", \"tags\": [\"pricing\", \"support\"], \"mode\": \"UPDATE_MODE_REPLACE\"}" \
  "$addr" cx.gateway.v1.SurveyService/SetFeedbackTags
case_ "SetFeedbackTags without a mode is INVALID_ARGUMENT" 67 '"field":"mode"' -- \
  -d "{\"feedback_id\": \"$feedback_id\", \"tags\": [\"x\"]}" "$addr" cx.gateway.v1.SurveyService/SetFeedbackTags
case_ "SetFeedbackTopics appends a topic" 0 '"deliveryId": ""' -- \
  -d "{\"feedback_id\": \"$feedback_id\", \"topics\": [{\"name\": \"Price\", \"sentiment\": \"SENTIMENT_NEGATIVE\"}], \"mode\": \"UPDATE_MODE_APPEND\"}" \
  "$addr" cx.gateway.v1.SurveyService/SetFeedbackTopics
case_ "GetFeedback shows the new tags and topic" 0 '"pricing"' '"name": "Price"' -- \
  -d "{\"feedback_id\": \"$feedback_id\"}" "$addr" cx.gateway.v1.SurveyService/GetFeedback
case_ "ListSentSurveys finds the survey sent above" 0 '"email": "ann@example.com"' \
  '"sentBy": "SENT_BY_' '"totalSize": "1"' -- \
  -d "{\"email\": \"ann@example.com\", \"end_time\": \"2100-01-01T00:00:00Z\"}" "$addr" \
  cx.gateway.v1.SurveyService/ListSentSurveys
case_ "ListReports reports one campaign" 0 "\"campaignId\": \"$campaign_id\"" '"deliveryStats"' \
  '"totalSize": "1"' -- \
  -d "{\"campaign_id\": \"$campaign_id\"}" "$addr" cx.gateway.v1.SurveyService/ListReports

# Event rules and the survey cool-down: rules written into the (empty) rules file, put in force by
# SIGHUP. The gateway logs each reload; wait for the log line rather than a fixed time.
events() { grpcurl -plaintext -emit-defaults -d "$1" "$addr" "cx.gateway.v1.EventService/$2"; }
reload_rules() {
  local text=$1 expect=$2
  printf '%s\n' "$text" >"$rules_file.partial" && mv "$rules_file.partial" "$rules_file"
  kill -HUP "$gateway_pid"
  for _ in $(seq 1 100); do
    events '{}' ListEventMappings | grep -qE -- "$expect" && return 0
    sleep 0.1
  done
  echo "  the rules did not reload: expected $expect"
}
csat_id=$(survey '{"type": "CAMPAIGN_TYPE_TRANSACTIONAL", "active": true, "metric": "METRIC_CSAT"}' \
  ListCampaigns | json_field campaigns 0 campaignId)
reload_rules "
[[rule]]
id = \"grpcurl-us-orders\"
events = [\"grpcurl_order\"]
campaign = \"$campaign_id\"
delay_days = 1
cooldown = \"14d\"
audience = { property = \"country\", eq = \"US\" }

[[rule]]
id = \"grpcurl-sampled\"
events = [\"grpcurl_order\"]
campaign = \"$csat_id\"
sample_percent = 0" '"ruleId": "grpcurl-us-orders"'
case_ "ListEventMappings shows the rules in force with source and version" 0 \
  '"ruleId": "grpcurl-us-orders"' '"source": "RULE_SOURCE_FILE"' '"rulesVersion": "[0-9a-f]{16}"' \
  '"audience": "property\.country eq \\"US\\""' '"delayDays": 1' '"rulesFile": ".*rules\.toml"' -- \
  -d '{"event": "grpcurl_order"}' "$addr" cx.gateway.v1.EventService/ListEventMappings
case_ "TrackEvent answers each rule's decision" 0 '"ruleId": "grpcurl-us-orders"' \
  '"decision": "RULE_DECISION_SENT"' '"outcome": "RECIPIENT_OUTCOME_SCHEDULED"' \
  '"decision": "RULE_DECISION_SAMPLED_OUT"' -- \
  -d '{"event": {"customer_id": "gf-1", "email": "fatigue@grpcurl-demo.com", "name": "grpcurl_order",
  "message_id": "grpcurl-order-1", "properties": {"country": "US"}}}' "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "TrackEvent outside a rule's audience is FILTERED_OUT" 0 '"decision": "RULE_DECISION_FILTERED_OUT"' -- \
  -d '{"event": {"customer_id": "gf-2", "email": "de@grpcurl-demo.com", "name": "grpcurl_order",
  "message_id": "grpcurl-order-2", "properties": {"country": "DE"}}}' "$addr" cx.gateway.v1.EventService/TrackEvent
case_ "SendSurvey inside the survey cool-down is THROTTLED with the eligible time" 0 \
  '"outcome": "RECIPIENT_OUTCOME_THROTTLED"' '"source": "THROTTLE_SOURCE_SURVEY_COOLDOWN"' \
  '"eligibleAt": "[0-9]{4}-' -- \
  -d "{\"campaign_id\": \"$csat_id\", \"recipients\": [{\"email\": \"Fatigue@grpcurl-demo.com\"}], \"survey_cooldown\": \"604800s\"}" \
  "$addr" cx.gateway.v1.SurveyService/SendSurvey
case_ "SendSurvey with a fractional survey_cooldown is INVALID_ARGUMENT" 67 '"field":"survey_cooldown"' -- \
  -d "{\"campaign_id\": \"$csat_id\", \"recipients\": [{\"email\": \"x@grpcurl-demo.com\"}], \"survey_cooldown\": \"1.5s\"}" \
  "$addr" cx.gateway.v1.SurveyService/SendSurvey
reload_rules "
[[rule]]
id = \"grpcurl-broken\"
events = [\"grpcurl_order\"]" '"rulesFileError": ".+'
case_ "a rules file that fails validation is refused and the rules in force stay" 0 \
  '"rulesFileError": ".*campaign' '"ruleId": "grpcurl-us-orders"' -- \
  -d '{}' "$addr" cx.gateway.v1.EventService/ListEventMappings
