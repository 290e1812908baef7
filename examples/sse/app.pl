# Server-Sent Events: GET / serves a page whose EventSource('/events') shows
# the progress of a (pretend) job.  The stream sends five `progress` events,
# 0% to 100%, a short pause apart, then a `done` event, and closes.
#
# Plain PAGI, so it runs unchanged on pagi-rs and on the reference server.
# Loaded with `do`: the file's last expression (the coderef) is the app.
use strict;
use warnings;
use Future::AsyncAwait;
use Future::IO;
# Makes Future::IO->sleep run on the server's IO::Async loop.  pagi-rs has
# already loaded it (so this is a no-op there); the reference server needs it.
use Future::IO::Impl::IOAsync;

# Seconds between two events: long enough to watch, short enough for tests.
my $STEP_DELAY = 0.2;

my $page = <<'HTML';
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>PAGI Server-Sent Events</title>
<style>
  body { font-family: sans-serif; max-width: 40em; margin: 2em auto; }
  progress { width: 100%; }
  pre { background: #f4f4f4; padding: .5em; }
</style>
</head>
<body>
<h1>PAGI Server-Sent Events</h1>
<progress id="bar" max="100" value="0"></progress>
<pre id="log"></pre>
<script>
// Every event is kept in window.received (and window.sse the state), so a
// test driving the browser can read exactly what EventSource delivered.
window.received = [];
window.sse = { opened: 0, errors: 0, done: false };

const log = document.getElementById('log');
const es = new EventSource('/events');

function keep(e) {
  // t: milliseconds since the page loaded, to see the events arrive apart.
  window.received.push({ type: e.type, id: e.lastEventId, data: e.data, t: Math.round(performance.now()) });
  log.textContent += '[' + e.type + ' #' + e.lastEventId + '] ' + e.data + '\n';
}

es.onopen = () => { window.sse.opened++; };
// EventSource reconnects by itself after an error or the end of a stream;
// counting errors lets a reconnect (which would replay the job) be noticed.
es.onerror = () => { window.sse.errors++; };
es.onmessage = keep;    // events without an `event:` field
es.addEventListener('progress', (e) => {
  keep(e);
  document.getElementById('bar').value = parseInt(e.data, 10);
});
es.addEventListener('done', (e) => {
  keep(e);
  // The job is over: closing here is what stops EventSource reconnecting
  // when the server ends the stream.
  es.close();
  window.sse.done = true;
});
</script>
</body>
</html>
HTML

async sub http_response {
    my ( $send, $status, $type, $body ) = @_;
    await $send->({
        type    => 'http.response.start',
        status  => $status,
        headers => [
            [ 'content-type',   $type ],
            [ 'content-length', length $body ],
        ],
    });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
}

async sub job_progress {
    my ( $scope, $receive, $send ) = @_;

    # An sse scope is any request that asks for text/event-stream; only
    # /events has a stream, so elsewhere we refuse it with an ordinary 404
    # (which also tells an EventSource not to reconnect).
    if ( $scope->{path} ne '/events' ) {
        return await http_response( $send, 404, 'text/plain', "Not found\n" );
    }

    await $send->({ type => 'sse.start', status => 200 });

    my @steps = (
        [ 0,   'started' ],
        [ 25,  'downloading' ],
        # Two lines: the server sends one `data:` line for each, and the
        # browser joins them back with "\n".
        [ 50,  "halfway\nstill downloading" ],
        [ 75,  'unpacking' ],
        [ 100, 'finished' ],
    );
    my $id = 0;
    for my $step (@steps) {
        my ( $percent, $what ) = @$step;
        await $send->({
            type  => 'sse.send',
            event => 'progress',
            id    => ++$id,
            data  => "$percent% $what",
        });
        await Future::IO->sleep($STEP_DELAY);
    }
    await $send->({ type => 'sse.send', event => 'done', id => ++$id, data => 'job complete' });
    await $send->({ type => 'sse.close', reason => 'job_complete' });
}

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;

    # No startup/shutdown work: returning without handling any lifespan
    # event tells the server the app declines the lifespan protocol.
    return if $scope->{type} eq 'lifespan';

    return await job_progress( $scope, $receive, $send ) if $scope->{type} eq 'sse';

    die "Unsupported scope type: $scope->{type}\n" unless $scope->{type} eq 'http';

    if ( $scope->{path} eq '/' && ( $scope->{method} eq 'GET' || $scope->{method} eq 'HEAD' ) ) {
        return await http_response( $send, 200, 'text/html; charset=utf-8', $page );
    }
    # /events without `Accept: text/event-stream` (a plain browser visit or
    # curl) is an http scope: say how to get the stream instead of a bare 404.
    if ( $scope->{path} eq '/events' ) {
        return await http_response( $send, 406, 'text/plain',
            "/events is an event stream: request it with 'Accept: text/event-stream'\n" );
    }
    return await http_response( $send, 404, 'text/plain', "Not found\n" );
};

$app;
