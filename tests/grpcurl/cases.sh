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
