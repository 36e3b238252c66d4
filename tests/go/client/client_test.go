package client

import (
	"context"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"sort"
	"testing"
	"time"

	pb "cxgw/gen/cxgatewayv1"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var (
	binaryFlag        = flag.String("binary", "", "the built cx-gateway")
	serviceConfigFlag = flag.String("service-config", "", "clients/service-config.json")
	gw                *gatewayProcess
	token             string
)

func TestMain(m *testing.M) {
	flag.Parse()
	var err error
	gw, err = startGateway(*binaryFlag, []string{"read", "events:write", "deliveries:read", "feedback:subscribe"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	token = gw.token
	code := m.Run()
	if err := gw.stop(); err != nil {
		fmt.Fprintln(os.Stderr, "the gateway did not exit cleanly:", err)
		code = 1
	}
	os.Exit(code)
}

func dial(t *testing.T, options ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, gw.grpc, append([]grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock()}, options...)...)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// [START go_auth]
// withCaller names the caller of every call made with the returned context.
func withCaller(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// [END go_auth]

// [START go_error_details]
// errorDetails returns the google.rpc details of a failed call; status.Details decodes every
// type registered by an imported package (errdetails registers ErrorInfo, BadRequest, RetryInfo).
func errorDetails(err error) (*errdetails.ErrorInfo, *errdetails.BadRequest, *errdetails.RetryInfo) {
	var info *errdetails.ErrorInfo
	var badRequest *errdetails.BadRequest
	var retry *errdetails.RetryInfo
	for _, detail := range status.Convert(err).Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.BadRequest:
			badRequest = d
		case *errdetails.RetryInfo:
			retry = d
		}
	}
	return info, badRequest, retry
}

// [END go_error_details]

func TestUnaryCallWithTokenAndDeadline(t *testing.T) {
	conn := dial(t)
	// [START go_unary]
	customers := pb.NewCustomerServiceClient(conn)
	ctx, cancel := context.WithTimeout(withCaller(context.Background()), 10*time.Second)
	defer cancel()
	page, err := customers.ListCustomers(ctx, &pb.ListCustomersRequest{PageSize: 5})
	// [END go_unary]
	if err != nil {
		t.Fatalf("ListCustomers: %v", err)
	}
	if len(page.Customers) != 5 || page.NextPageToken == "" {
		t.Fatalf("expected a full first page, got %d customers, token %q", len(page.Customers), page.NextPageToken)
	}
	_, err = customers.ListCustomers(context.Background(), &pb.ListCustomersRequest{PageSize: 5})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a call without a token: %v", err)
	}
	if info, _, _ := errorDetails(err); info == nil || info.Reason != "CALLER_UNAUTHENTICATED" {
		t.Fatalf("a call without a token carries no CALLER_UNAUTHENTICATED: %v", info)
	}
}

func TestBadRequestCarriesErrorInfoAndFieldViolations(t *testing.T) {
	events := pb.NewEventServiceClient(dial(t))
	ctx, cancel := context.WithTimeout(withCaller(context.Background()), 10*time.Second)
	defer cancel()
	// [START go_bad_request]
	_, err := events.TrackEvent(ctx, &pb.TrackEventRequest{Event: &pb.Event{Name: ""}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("expected INVALID_ARGUMENT, got %v", err)
	}
	info, badRequest, _ := errorDetails(err)
	if info.GetDomain() != "cx-gateway" || info.GetReason() != "INVALID_FIELDS" {
		t.Fatalf("unexpected ErrorInfo %v", info)
	}
	var fields []string
	for _, violation := range badRequest.GetFieldViolations() {
		fields = append(fields, violation.GetField())
	}
	// [END go_bad_request]
	sort.Strings(fields)
	if fmt.Sprint(fields) != "[event.customer_id event.name]" {
		t.Fatalf("unexpected field violations %v", fields)
	}
}

func TestAsyncWriteIsFollowedWithGetDelivery(t *testing.T) {
	conn := dial(t)
	events := pb.NewEventServiceClient(conn)
	deliveries := pb.NewDeliveryServiceClient(conn)
	customerID := fmt.Sprintf("go-%d", os.Getpid())
	ctx, cancel := context.WithTimeout(withCaller(context.Background()), 30*time.Second)
	defer cancel()
	// [START go_async_write]
	// Acknowledged once durably queued; the idempotency key makes a repeated call (a retry after
	// a lost answer) return the first call's delivery instead of queueing the event twice.
	request := &pb.TrackEventRequest{
		Event: &pb.Event{CustomerId: customerID, Name: "trial_started"},
		Options: &pb.WriteOptions{
			Mode:           pb.DeliveryMode_DELIVERY_MODE_ASYNC,
			IdempotencyKey: "trial-" + customerID,
		},
	}
	accepted, err := events.TrackEvent(ctx, request)
	if err != nil {
		t.Fatalf("TrackEvent: %v", err)
	}
	again, err := events.TrackEvent(ctx, request)
	if err != nil || again.DeliveryId != accepted.DeliveryId {
		t.Fatalf("a repeated key gave %v, %v", again, err)
	}
	// Follow the delivery until it leaves the queue.
	var delivery *pb.Delivery
	for {
		got, err := deliveries.GetDelivery(ctx, &pb.GetDeliveryRequest{DeliveryId: accepted.DeliveryId})
		if err != nil {
			t.Fatalf("GetDelivery: %v", err)
		}
		delivery = got.Delivery
		state := delivery.State
		if state == pb.DeliveryState_DELIVERY_STATE_DELIVERED || state == pb.DeliveryState_DELIVERY_STATE_DEAD_LETTERED {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// [END go_async_write]
	if delivery.State != pb.DeliveryState_DELIVERY_STATE_DELIVERED || delivery.IdempotencyKey != "trial-"+customerID {
		t.Fatalf("unexpected delivery %v", delivery)
	}
	var received struct {
		Events []struct {
			CustomerID interface{} `json:"customerId"`
			Event      string      `json:"event"`
		} `json:"events"`
	}
	if err := gw.sandboxCall("GET", "/retainly/events", nil, &received); err != nil {
		t.Fatal(err)
	}
	count := 0
	for _, e := range received.Events {
		if fmt.Sprint(e.CustomerID) == customerID && e.Event == "trial_started" {
			count++
		}
	}
	if count != 1 {
		t.Fatalf("retainly received the event %d times", count)
	}
}

// [START go_feedback_stream]
// consume reads a subscription, handing each event to handle until it returns true, and returns
// the cursor to resume from: the last message processed (event or heartbeat). Store it with the
// effect of processing; a later Subscribe with that cursor continues right after it.
func consume(client pb.FeedbackStreamClient, request *pb.SubscribeRequest, handle func(*pb.FeedbackEvent) bool) (string, error) {
	// No deadline: a subscription is long-lived. Returning cancels the call.
	ctx, cancel := context.WithCancel(withCaller(context.Background()))
	defer cancel()
	stream, err := client.Subscribe(ctx, request)
	if err != nil {
		return "", err
	}
	cursor := request.GetCursor()
	for {
		message, err := stream.Recv()
		if err != nil {
			return cursor, err // reconnect from cursor
		}
		if heartbeat := message.GetHeartbeat(); heartbeat != nil {
			cursor = heartbeat.Cursor
			continue
		}
		event := message.GetFeedbackEvent()
		done := handle(event)
		cursor = event.Cursor
		if done {
			return cursor, nil
		}
	}
}

// [END go_feedback_stream]

func simulate(t *testing.T, count int) map[string]bool {
	t.Helper()
	var answer struct {
		Feedback []struct {
			ID string `json:"id"`
		} `json:"feedback"`
	}
	if err := gw.sandboxCall("POST", "/feedback/simulate", map[string]int{"count": count}, &answer); err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, f := range answer.Feedback {
		ids[f.ID] = true
	}
	return ids
}

func TestFeedbackStreamResumesByCursor(t *testing.T) {
	client := pb.NewFeedbackStreamClient(dial(t))
	// The start of the log before any response arrives: the first heartbeat of a LATEST stream.
	ctx, cancel := context.WithTimeout(withCaller(context.Background()), 30*time.Second)
	stream, err := client.Subscribe(ctx, &pb.SubscribeRequest{Start: &pb.SubscribeRequest_Position{Position: pb.StreamPosition_STREAM_POSITION_LATEST}})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	cancel()
	if err != nil || first.GetHeartbeat() == nil {
		t.Fatalf("the first message is a heartbeat: %v %v", first, err)
	}
	origin := first.GetHeartbeat().Cursor
	from := func(cursor string) *pb.SubscribeRequest {
		return &pb.SubscribeRequest{Start: &pb.SubscribeRequest_Cursor{Cursor: cursor}}
	}
	until := func(wanted map[string]bool, into *[]*pb.FeedbackEvent) func(*pb.FeedbackEvent) bool {
		return func(event *pb.FeedbackEvent) bool {
			*into = append(*into, event)
			delete(wanted, event.Feedback.FeedbackId)
			return len(wanted) == 0
		}
	}

	var firstEvents, secondEvents []*pb.FeedbackEvent
	resumeAt, err := consume(client, from(origin), until(simulate(t, 3), &firstEvents))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := consume(client, from(resumeAt), until(simulate(t, 3), &secondEvents)); err != nil {
		t.Fatal(err)
	}
	seen := append(firstEvents, secondEvents...)
	for i := 1; i < len(seen); i++ {
		if seen[i].Sequence <= seen[i-1].Sequence {
			t.Fatalf("a repeated or reordered entry across the reconnect at %d", i)
		}
	}
	last := seen[len(seen)-1].Sequence
	var whole []*pb.FeedbackEvent
	if _, err := consume(client, from(origin), func(event *pb.FeedbackEvent) bool {
		whole = append(whole, event)
		return event.Sequence >= last
	}); err != nil {
		t.Fatal(err)
	}
	describe := func(events []*pb.FeedbackEvent) string {
		text := ""
		for _, e := range events {
			text += fmt.Sprintf("%d/%s/%s ", e.Sequence, e.Feedback.FeedbackId, e.Kind)
		}
		return text
	}
	if describe(whole) != describe(seen) {
		t.Fatalf("a gap across the reconnect:\n resumed: %s\n whole:   %s", describe(seen), describe(whole))
	}
	if len(seen) < 6 {
		t.Fatalf("expected at least the six simulated responses, got %d", len(seen))
	}
}

func TestServiceConfigRetriesARefusedRead(t *testing.T) {
	serviceConfigPath := *serviceConfigFlag
	// [START go_service_config]
	// The gateway's published service config: per-method timeouts, and retries where they are
	// safe, paced by the gateway's grpc-retry-pushback-ms (its RetryInfo delay). grpc-go before
	// 1.40 (Debian 12 ships 1.33) retries only with GRPC_GO_RETRY=on in the environment.
	serviceConfig, err := ioutil.ReadFile(serviceConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	conn := dial(t, grpc.WithDefaultServiceConfig(string(serviceConfig)))
	// [END go_service_config]
	customers := pb.NewCustomerServiceClient(conn)
	labels := map[string]string{"rpc_service": "cx.gateway.v1.CustomerService", "rpc_method": "ListCustomers"}
	callsBefore, err := gw.metric("rpc_server_calls_total", labels)
	if err != nil {
		t.Fatal(err)
	}
	var before sandboxStats
	if err := gw.sandboxCall("GET", "/stats", nil, &before); err != nil {
		t.Fatal(err)
	}
	// Retently refuses the next four requests (429, Retry-After: 1). The gateway's own retries use
	// up its four attempts on them and answer RESOURCE_EXHAUSTED with RetryInfo; the client's
	// policy calls again after the pushback and that call reaches a willing upstream.
	if err := gw.sandboxCall("PUT", "/faults/retently", map[string]int{"burst429": 4, "burstRetryAfterSecs": 1}, nil); err != nil {
		t.Fatal(err)
	}
	page, err := customers.ListCustomers(withCaller(context.Background()), &pb.ListCustomersRequest{PageSize: 3})
	if clearErr := gw.sandboxCall("DELETE", "/faults/retently", nil, nil); clearErr != nil {
		t.Fatal(clearErr)
	}
	if err != nil || len(page.Customers) != 3 {
		t.Fatalf("the retried read failed: %v", err)
	}
	var after sandboxStats
	if err := gw.sandboxCall("GET", "/stats", nil, &after); err != nil {
		t.Fatal(err)
	}
	if refused := after.Faults.Retently.Forced429 - before.Faults.Retently.Forced429; refused != 4 {
		t.Fatalf("expected the four refusals to be met, got %d", refused)
	}
	if answered := after.count("/api/v2/customers", 200) - before.count("/api/v2/customers", 200); answered != 1 {
		t.Fatalf("expected one answered upstream request, got %d", answered)
	}
	// The gateway counts a call once its answer is written, which may trail the client's view by
	// a moment: wait for the count to settle (bounded), then check it.
	var calls float64
	for i := 0; i < 50; i++ {
		total, err := gw.metric("rpc_server_calls_total", labels)
		if err != nil {
			t.Fatal(err)
		}
		if calls = total - callsBefore; calls >= 2 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if calls != 2 {
		t.Fatalf("expected the application's one call to reach the gateway twice, got %v", calls)
	}
}
