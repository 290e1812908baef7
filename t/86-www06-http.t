use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::SSE;
use PagiRS::WS;
use File::Temp qw(tempdir);
use JSON::PP;
use Time::HiRes qw(time sleep);

# PAGI Www 0.6 on http and sse scopes, as the server speaks it by default:
# the capability check helper libraries make, pagi.connection's end
# notifications (on_end, end_future, disconnect_future, on_disconnect,
# on_complete) and their isolation and timing, disconnect_detail, abort in
# every phase, the disconnect-receive limit, the body shape rule, trailers,
# SSE refusals and the SSE terminal event -- each with the --spec-version 0.3
# behaviour beside it where the two differ.  The app writes what it observes
# as JSON lines into files in a temp dir; the test reads them.

$SIG{PIPE} = 'IGNORE';    # the test closes sockets the server still writes to

my $dir = tempdir( CLEANUP => 1 );
my $J   = JSON::PP->new->canonical->allow_nonref;

# A file for the body-shape tests to send as a `file` / `fh` body.
my $payload_file = "$dir/payload.txt";
{
    open my $fh, '>', $payload_file or die "write $payload_file: $!";
    print $fh "FILE-BYTES\n";
    close $fh;
}

# Values the client sends that must never show up in a disconnect_detail.
my $SECRET_HEADER = 'hdr-s3cr3t-7f1e';
my $SECRET_TOKEN  = 'Bearer tok-s3cr3t-99ab';
my $SECRET_BODY   = 'BODY-S3CR3T-42';

my $app_code = <<'APP';
use strict; use warnings;
use Future; use Future::AsyncAwait; use Future::IO; use JSON::PP;
use Scalar::Util qw(blessed);
use Time::HiRes qw(time);

my $DIR  = '__DIR__';
my $FILE = '__FILE__';
my $J    = JSON::PP->new->canonical->allow_nonref;

sub rec {
    my ($name, $data) = @_;
    open my $fh, '>>', "$DIR/$name" or die "open $DIR/$name: $!";
    print $fh $J->encode($data), "\n";
    close $fh;
}

sub state_of {
    my ($c) = @_;
    return {
        connected => $c->is_connected ? 1 : 0,
        reason    => $c->disconnect_reason,
        detail    => $c->disconnect_detail,
        started   => $c->response_started ? 1 : 0,
        complete  => $c->response_complete ? 1 : 0,
    };
}

# '' if the send resolved, else its failure message.
async sub try_send {
    my ($send, $ev) = @_;
    my $ok = eval { await $send->($ev); 1 };
    return $ok ? '' : ("$@" || 'failed');
}

# $f or, after $secs, the string 'TIMEOUT' (an app must never hang a test).
sub within {
    my ($f, $secs) = @_;
    return Future->wait_any($f, Future::IO->sleep($secs)->then(sub { Future->done('TIMEOUT') }));
}

# What a Future holds right now, as a string.
sub fstate {
    my ($f) = @_;
    return 'pending'   unless $f->is_ready;
    return 'cancelled' if $f->is_cancelled;
    return 'failed: ' . ($f->failure // '') if $f->is_failed;
    my ($v) = $f->get;
    return 'done: ' . (defined $v ? (ref $v ? $J->encode($v) : $v) : 'undef');
}

# MAJOR.MINOR compared as numbers per part (0.10 is later than 0.6), as
# PAGI-Tools' helpers do before relying on Www 0.6 features.
sub version_at_least {
    my ($have, $want) = @_;
    return 0 unless defined $have && $have =~ /\A(\d+)\.(\d+)\z/;
    my ($hM, $hm) = ($1, $2);
    my ($wM, $wm) = $want =~ /\A(\d+)\.(\d+)\z/;
    return $hM > $wM || ($hM == $wM && $hm >= $wm) ? 1 : 0;
}

sub capability {
    my ($scope) = @_;
    my $type = $scope->{type};
    my $c    = $scope->{'pagi.connection'};
    my @need = qw(response_started is_connected on_end disconnect_reason disconnect_detail);
    push @need, qw(close_code close_reason) if $type eq 'websocket';
    push @need, 'end_future' if $type eq 'sse';
    push @need, qw(on_disconnect abort);    # PAGI::Response::Stream
    push @need, qw(is_connected disconnect_reason disconnect_detail on_disconnect on_complete on_end
        end_future disconnect_future response_started response_complete abort close_code close_reason);
    my %seen;
    @need = grep { !$seen{$_}++ } @need;
    my @missing = blessed($c) ? grep { !$c->can($_) } @need : ('pagi.connection is not a blessed object');
    my %r = (type => $type, pagi => $scope->{pagi}, missing => \@missing,
        spec_ok => version_at_least($scope->{pagi}{spec_version}, '0.6'));
    if ($type ne 'websocket' && blessed($c) && $c->can('close_code')) {
        $r{close_code_defined}   = defined $c->close_code   ? 1 : 0;
        $r{close_reason_defined} = defined $c->close_reason ? 1 : 0;
    }
    return $J->encode(\%r);
}

my $plain = [['content-type', 'text/plain']];

async sub reply {
    my ($send, $status, $body) = @_;
    await $send->({ type => 'http.response.start', status => $status, headers => $plain });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
}

# Read the whole request body.
async sub read_body {
    my ($receive) = @_;
    my $body = '';
    while (1) {
        my $ev = await $receive->();
        $body .= $ev->{body} // '';
        last unless $ev->{more};
    }
    return $body;
}

our $IN_SEND = 0;

my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $path = $scope->{path};
    my $type = $scope->{type};
    my $qs   = $scope->{query_string} // '';
    my $spec = $scope->{pagi}{spec_version};
    my $c    = $scope->{'pagi.connection'};

    if ($path eq '/cap') {
        my $report = capability($scope);
        if ($type eq 'websocket') {
            await $receive->();
            await $send->({ type => 'websocket.accept' });
            await $send->({ type => 'websocket.send', text => $report });
            await $send->({ type => 'websocket.close' });
        }
        elsif ($type eq 'sse') {
            await $send->({ type => 'sse.start' });
            await $send->({ type => 'sse.send', event => 'cap', data => $report });
            await $send->({ type => 'sse.close' });
        }
        else {
            await reply($send, 200, $report);
        }
        return;
    }
    if ($path eq '/ok') {
        await reply($send, 200, 'ok');
        return;
    }

    # ---- end notifications ------------------------------------------------
    if ($path eq '/end') {    # ?clean or ?abnormal
        my @log;
        my $note = sub { my ($what, @args) = @_; push @log, { what => $what, args => \@args, state => state_of($c) } };
        $c->on_end(sub { $note->('on_end', @_) });
        $c->on_complete(sub { $note->('on_complete', @_) });
        $c->on_disconnect(sub { $note->('on_disconnect', @_) });
        my $ef = $c->end_future;
        $ef->on_ready(sub { $note->('end_future', fstate($_[0])) });
        my $df = $c->disconnect_future;
        $df->on_ready(sub { $note->('disconnect_future', fstate($_[0])) });
        # Isolation: cancelling one Future from either method leaves the others.
        my $df_cancelled = $c->disconnect_future;
        my $ef_cancelled = $c->end_future;
        $df_cancelled->cancel;
        $ef_cancelled->cancel;
        my $df_other = $c->disconnect_future;
        my $ef_other = $c->end_future;
        my %o;
        await $receive->();
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        if ($qs eq 'clean') {
            my $f = $send->({ type => 'http.response.body', body => 'clean', more => 0 });
            $o{after_final_send} = state_of($c);
            $o{notified_inside_send} = scalar @log;
            await $f;
            $o{end_future_value} =
              await within($c->end_future->then(sub { Future->done('done: ' . ($_[0] // 'undef')) }), 3);
        }
        else {
            await $send->({ type => 'http.response.body', body => 'part1', more => 1 });
            rec('end-abnormal-ready', { t => time });
            # Wait on the Future that was not cancelled: it must still resolve.
            await within($df_other, 5);
        }
        await Future::IO->sleep(0.1);    # every notification has run by now
        $o{log}          = \@log;
        $o{df}           = fstate($df);
        $o{df_other}     = fstate($df_other);
        $o{ef_other}     = fstate($ef_other);
        $o{df_cancelled} = fstate($df_cancelled);
        $o{ef_cancelled} = fstate($ef_cancelled);
        # Late registration, after the end.
        my @late;
        $c->on_end(sub { push @late, ['on_end', @_] });
        $c->on_disconnect(sub { push @late, ['on_disconnect', @_] });
        $c->on_complete(sub { push @late, ['on_complete', @_] });
        $o{late} = \@late;
        $o{late_end_future}        = fstate($c->end_future);
        $o{late_disconnect_future} = fstate($c->disconnect_future);
        $o{final} = state_of($c);
        rec("end-$qs", \%o);
        return;
    }

    # ---- disconnect_detail -------------------------------------------------
    if ($path eq '/detail-closed') {
        my $body = await read_body($receive);
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        await $send->({ type => 'http.response.body', body => 'started', more => 1 });
        my $r = await within($c->end_future, 5);
        rec('detail-closed', { end => $r, state => state_of($c), body_len => length $body });
        return;
    }
    if ($path eq '/detail-big') {
        my @ran;
        $c->on_disconnect(sub { push @ran, [@_] });
        my (@types, $len);
        $len = 0;
        while (1) {
            my $ev = await within($receive->(), 5);
            if (!ref $ev) { push @types, $ev; last }
            push @types, $ev->{type};
            $len += length($ev->{body} // '');
            last unless $ev->{type} eq 'http.request' && $ev->{more};
        }
        await Future::IO->sleep(0.1);
        rec('detail-big', { types => \@types, len => $len, callbacks => \@ran, state => state_of($c) });
        return;
    }
    if ($path eq '/detail-die') {
        $c->on_disconnect(sub { rec('detail-die', { args => [@_], state => state_of($c) }) });
        await read_body($receive);
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        await $send->({ type => 'http.response.body', body => 'started', more => 1 });
        die "detail-test-exception at the app\n";
    }

    # ---- no notification inside $send ------------------------------------
    if ($path eq '/in-send') {    # ?parked or ?stream
        my @log;
        my $note = sub { push @log, { what => $_[0], in_send => $IN_SEND } };
        my $gsend = sub { local $IN_SEND = 1; return $send->(@_) };
        $c->on_disconnect(sub { $note->('on_disconnect') });
        $c->on_end(sub { $note->('on_end') });
        $c->disconnect_future->on_ready(sub { $note->('disconnect_future') });
        $c->end_future->on_ready(sub { $note->('end_future') });
        await $receive->();
        $receive->()->on_ready(sub { $note->('receive') });    # stays pending until the end
        await $gsend->({ type => 'http.response.start', status => 200, headers => $plain });
        my %o = (mode => $qs);
        if ($qs eq 'parked') {
            my $chunk = 'p' x 65536;
            for my $i (1 .. 400) {
                my $f = $gsend->({ type => 'http.response.body', body => $chunk, more => 1 });
                if (!$f->is_ready) {
                    await within($f->without_cancel, 0.3);
                    if (!$f->is_ready) {
                        $f->on_ready(sub { $note->('parked_send') });
                        rec('in-send-parked-ready', { i => $i });
                        $o{parked} = await within($f->without_cancel->then(sub { Future->done('resolved') }), 5);
                        last;
                    }
                }
                await $f;
            }
        }
        else {
            # Small chunks, never checking is_connected: one of these sends
            # may be the first to find the connection gone.
            for my $i (1 .. 300) {
                await $gsend->({ type => 'http.response.body', body => ('s' x 1024) . "\n", more => 1 });
                rec('in-send-stream-ready', { i => $i }) if $i == 3;
                last if grep { $_->{what} eq 'on_end' } @log;
                await Future::IO->sleep(0.01);
            }
        }
        # Sends after the end are no-ops; still nothing may run inside them.
        for my $i (1 .. 3) { await $gsend->({ type => 'http.response.body', body => 'late', more => 1 }) }
        await Future::IO->sleep(0.1);
        $o{log} = \@log;
        rec("in-send-$qs", \%o);
        return;
    }

    # ---- a dying callback does not stop the others -----------------------
    if ($path eq '/cb-die') {    # ?clean or ?abnormal
        my @ran;
        $c->on_disconnect(sub { die "first on_disconnect dies\n" });
        $c->on_disconnect(sub { push @ran, 'on_disconnect#2' });
        $c->on_end(sub { die "first on_end dies\n" });
        $c->on_end(sub { push @ran, 'on_end#2' });
        $c->on_complete(sub { die "first on_complete dies\n" });
        $c->on_complete(sub { push @ran, 'on_complete#2' });
        my $ef = $c->end_future;
        await $receive->();
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        if ($qs eq 'clean') {
            await $send->({ type => 'http.response.body', body => 'done', more => 0 });
        }
        else {
            await $send->({ type => 'http.response.body', body => 'part1', more => 1 });
            rec('cb-die-abnormal-ready', {});
        }
        my $end = await within($ef, 5);
        await Future::IO->sleep(0.1);
        rec("cb-die-$qs", { ran => \@ran, end_future => $end, state => state_of($c) });
        return;
    }

    # ---- a send parked on backpressure settles at the disconnect --------
    if ($path eq '/parked') {
        my @ran;
        $c->on_disconnect(sub { push @ran, { reason => $_[0], t => time } });
        await $receive->();
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        my $chunk = 'b' x 65536;
        for my $i (1 .. 400) {
            my $f = $send->({ type => 'http.response.body', body => $chunk, more => 1 });
            if (!$f->is_ready) {
                await within($f->without_cancel, 0.3);
                if (!$f->is_ready) {
                    my %o = (i => $i, parked_state => state_of($c));
                    # Observed at the moment the parked send settles.
                    $f->on_ready(sub {
                        $o{at_settle} = { future => fstate($_[0]), connected => $c->is_connected ? 1 : 0,
                            reason => $c->disconnect_reason, callbacks_ran => scalar @ran, t => time };
                    });
                    rec('parked-ready', { i => $i });
                    my $r = await within($f->without_cancel->then(sub { Future->done('settled') },
                        sub { Future->done('failed: ' . $_[0]) }), 4);
                    $o{outcome} = $r;
                    await Future::IO->sleep(0.05);
                    $o{callbacks} = \@ran;
                    rec('parked', \%o);
                    return;
                }
            }
            await $f;
        }
        rec('parked', { never_parked => 1 });
        return;
    }

    # ---- abort -------------------------------------------------------------
    if ($path eq '/abort-before') {
        my @ran;
        $c->on_disconnect(sub { push @ran, ['on_disconnect', @_] });
        $c->on_end(sub { push @ran, ['on_end', @_] });
        await $receive->();
        $c->abort('app-said-no');
        my %o = (after_abort => state_of($c), callbacks_inside_abort => scalar @ran);
        my $f = $send->({ type => 'http.response.start', status => 200, headers => $plain });
        $o{start_send} = fstate($f);
        $o{body_send} = await try_send($send, { type => 'http.response.body', body => 'late', more => 0 });
        await Future::IO->sleep(0.1);
        $o{callbacks} = \@ran;
        $o{final}     = state_of($c);
        rec('abort-before', \%o);
        return;
    }
    if ($path eq '/abort-mid') {
        await $receive->();
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        my $chunk = 'm' x 65536;
        my ($accepted, $parked) = (0, undef);
        for my $i (1 .. 400) {
            my $f = $send->({ type => 'http.response.body', body => $chunk, more => 1 });
            $accepted += length $chunk;
            if (!$f->is_ready) {
                await within($f->without_cancel, 0.3);
                if (!$f->is_ready) { $parked = $f; last }
            }
            await $f;
        }
        my %o = (accepted => $accepted, parked => $parked ? 1 : 0);
        $c->abort('mid-stream');
        $o{after_abort} = state_of($c);
        $o{t_abort}     = time;
        rec('abort-mid-aborted', { accepted => $accepted });
        if ($parked) {
            $o{parked_outcome} = await within($parked->without_cancel->then(sub { Future->done('settled') },
                sub { Future->done('failed: ' . $_[0]) }), 3);
        }
        $o{later_send} = await try_send($send, { type => 'http.response.body', body => 'x', more => 0 });
        rec('abort-mid', \%o);
        return;
    }
    if ($path eq '/abort-after') {
        my @ran;
        $c->on_disconnect(sub { push @ran, ['on_disconnect', @_] });
        $c->on_complete(sub { push @ran, ['on_complete'] });
        await $receive->();
        await reply($send, 200, 'done');
        $c->abort('too-late');    # right after the end...
        my %o = (after_first_abort => state_of($c));
        await Future::IO->sleep(0.05);
        $c->abort('too-late-again');    # ...and once the end was notified
        await Future::IO->sleep(0.05);
        $o{callbacks} = \@ran;
        $o{final}     = state_of($c);
        rec('abort-after', \%o);
        return;
    }
    if ($path eq '/sse-abort-before') {
        my $first = await $receive->();
        $c->abort('sse-no');
        my %o = (first => $first->{type}, after_abort => state_of($c));
        $o{start_send} = await try_send($send, { type => 'sse.start' });
        $o{event_send} = await try_send($send, { type => 'sse.send', data => 'late' });
        $o{receive}    = await within($receive->(), 2);
        rec('sse-abort-before', \%o);
        return;
    }
    if ($path eq '/sse-abort-after') {
        await $receive->();
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.send', data => 'one' });
        my $rf = $receive->();
        await Future::IO->sleep(0.2);    # let the client read the event
        $c->abort('sse-bye');
        my %o = (after_abort => state_of($c), receive_ready_inside_abort => $rf->is_ready ? 1 : 0);
        $o{receive}    = await within($rf, 3);
        $o{event_send} = await try_send($send, { type => 'sse.send', data => 'late' });
        rec('sse-abort-after', \%o);
        return;
    }

    # ---- receives after the end -------------------------------------------
    if ($path eq '/receives') {
        my ($n) = $qs =~ /n=(\d+)/;
        await $receive->();
        await reply($send, 200, 'done');
        my @got;
        for my $i (1 .. $n) {
            my $f = $receive->();
            push @got, !$f->is_ready ? 'pending' : $f->is_failed ? 'failed: ' . $f->failure : $f->get->{type};
        }
        rec("receives-$n", { got => \@got });
        return;
    }

    # ---- body shape ----------------------------------------------------------
    if ($path eq '/shape') {    # ?file or ?fh
        await $receive->();
        await $send->({ type => 'http.response.start', status => 200, headers => $plain });
        await $send->({ type => 'http.response.body', body => 'inline;', more => 1 });
        my %ev = (type => 'http.response.body');
        if ($qs eq 'fh') { open my $fh, '<', $FILE or die "open $FILE: $!"; $ev{fh} = $fh }
        else             { $ev{file} = $FILE }
        my %o = (err => await try_send($send, \%ev));
        $o{after} = state_of($c);
        if ($o{err} ne '') {
            $o{finish} = await try_send($send, { type => 'http.response.body', body => 'end', more => 0 });
        }
        rec("shape-$qs-$spec", \%o);
        return;
    }

    # ---- trailers ------------------------------------------------------------
    if ($path eq '/trailers') {
        await $receive->();
        my %o;
        await $send->({ type => 'http.response.start', status => 200, headers => $plain, trailers => 1 });
        await $send->({ type => 'http.response.body', body => 'payload', more => 0 });
        $o{after_final_body} = state_of($c);
        await $send->({ type => 'http.response.trailers', headers => [['x-checksum', 'abc123']] });
        $o{after_trailers} = state_of($c);
        rec('trailers', \%o);
        return;
    }

    # ---- SSE -------------------------------------------------------------------
    if ($path eq '/sse-refuse') {
        my @ran;
        $c->on_disconnect(sub { push @ran, ['on_disconnect', @_] });
        $c->on_complete(sub { push @ran, ['on_complete'] });
        $c->on_end(sub { push @ran, ['on_end', @_] });
        my %o = (first => (await $receive->())->{type});
        my $pending = $receive->();
        $o{pending_ready_before} = $pending->is_ready ? 1 : 0;
        await $send->({ type => 'http.response.start', status => 404,
            headers => [['content-type', 'text/plain'], ['x-app', 'refused']] });
        await $send->({ type => 'http.response.body', body => 'no stream here', more => 0 });
        $o{sse_send_after}  = await try_send($send, { type => 'sse.send', data => 'x' });
        $o{sse_start_after} = await try_send($send, { type => 'sse.start' });
        $o{pending} = await within($pending, 2);
        $o{later}   = await within($receive->(), 2);
        await Future::IO->sleep(0.1);
        $o{callbacks} = \@ran;
        $o{final}     = state_of($c);
        rec('sse-refuse', \%o);
        return;
    }
    if ($path eq '/sse-late-http') {
        await $send->({ type => 'sse.start' });
        my %o;
        $o{start} = await try_send($send, { type => 'http.response.start', status => 404, headers => $plain });
        $o{body}  = await try_send($send, { type => 'http.response.body', body => 'x', more => 0 });
        await $send->({ type => 'sse.send', event => 'result', data => $J->encode(\%o) });
        await $send->({ type => 'sse.close' });
        return;
    }
    if ($path eq '/sse-old-refuse') {
        my %o = (start => await try_send($send,
            { type => 'sse.http.response.start', status => 404, headers => $plain }));
        if ($o{start} eq '') {
            $o{body} = await try_send($send, { type => 'sse.http.response.body', body => 'refused (sse.http)', more => 0 });
        }
        else {
            await reply($send, 404, 'refused (http)');
        }
        rec("sse-old-refuse-$spec", \%o);
        return;
    }
    if ($path eq '/sse-return') {
        $c->on_disconnect(sub { rec("sse-return-$spec", { event => 'on_disconnect', args => [@_] }) });
        $c->on_complete(sub { rec("sse-return-$spec", { event => 'on_complete' }) });
        await $send->({ type => 'sse.start' });
        await $send->({ type => 'sse.send', data => 'bye' });
        return;    # no sse.close
    }
    if ($path eq '/sse-wait-before') {
        my $first = await $receive->();
        rec('sse-wait-before', { stage => 'waiting', first => $first });
        my $ev = await within($receive->(), 5);
        rec('sse-wait-before', { stage => 'ended', event => $ev, state => state_of($c) });
        return;
    }
    if ($path eq '/sse-early-ka') {
        my $err = await try_send($send, { type => 'sse.keepalive', interval => 0.15 });
        rec("sse-early-ka-$spec", { err => $err });
        await $send->({ type => 'sse.start' });
        await Future::IO->sleep(0.7);
        await $send->({ type => 'sse.send', data => 'done' });
        await $send->({ type => 'sse.close' });
        return;
    }

    await reply($send, 404, 'not found');
};
$app;
APP
$app_code =~ s/__DIR__/$dir/g;
$app_code =~ s/__FILE__/$payload_file/g;
my $app = write_app($app_code);

# The servers: the default (Www 0.6), the same app under --spec-version 0.3,
# and one with small limits (body size, disconnect receives, water marks)
# for the tests that need them.
my $main   = start_server( '--access-log', "$dir/access.log", $app );
my $legacy = start_server( '--spec-version', '0.3', '--access-log', "$dir/legacy.log", $app );
my $tight  = start_server(
    '--max-body-size',        1024, '--max-disconnect-receives', 5,
    '--write-high-watermark', 16384, '--write-low-watermark',    4096,
    '--access-log', "$dir/tight.log", $app
);
my ( $port, $lport, $tport ) = ( $main->port, $legacy->port, $tight->port );

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# The first record in file $name (decoded), waiting up to $timeout.
sub rec_wait {
    my ( $name, $timeout, $re ) = @_;
    my $l = wait_file_line( "$dir/$name", $re // qr/./, $timeout // 5 );
    return defined $l ? $J->decode($l) : undef;
}

# A GET request head (keep-alive unless told), with extra header lines.
sub get_req {
    my ( $path, @h ) = @_;
    return "GET $path HTTP/1.1\r\nHost: 127.0.0.1\r\n" . join( '', map { "$_\r\n" } @h ) . "\r\n";
}

# Connect, send $bytes, read until $re matches (or $timeout); returns the
# socket (still open) and what was read.
sub open_until {
    my ( $p, $bytes, $re, $timeout ) = @_;
    my $s = connect_port($p);
    $s->syswrite($bytes);
    my ($buf) = read_sock( $s, $re, $timeout // 5 );
    return ( $s, $buf );
}

# Server output written since $mark (a length of ->output earlier).
sub output_since { my ( $srv, $mark ) = @_; substr( $srv->output, $mark ) }

# Poll until the server output written since $mark matches $re; 1 if it did.
sub wait_output_since {
    my ( $srv, $mark, $re, $timeout ) = @_;
    my $deadline = time + ( $timeout // 3 );
    while (1) {
        return 1 if output_since( $srv, $mark ) =~ $re;
        return 0 if time > $deadline;
        sleep 0.05;
    }
}

# Send $bytes on a fresh connection and read until the server closes it (or
# $timeout); returns (bytes read, closed?, seconds taken).  An empty answer
# only counts as "nothing" if the server also closed.
sub exchange {
    my ( $p, $bytes, $timeout ) = @_;
    my $t0 = time;
    my $s  = connect_port($p);
    $s->syswrite($bytes);
    my ( $buf, $closed ) = read_sock( $s, undef, $timeout // 3 );
    return ( $buf, $closed, time - $t0 );
}

# ---------------------------------------------------------------------------
# 1. Capability check
# ---------------------------------------------------------------------------
subtest 'capability check (PAGI-Tools 0.002003 style) passes on http, sse and websocket scopes' => sub {
    for my $case ( [ $port, '0.6', '0.5', 1 ], [ $lport, '0.3', '0.4', 0 ] ) {
        my ( $p, $www, $core, $ok ) = @$case;
        my $http = eval { $J->decode( http_request( $p, 'GET', '/cap' )->{body} // '' ) } // {};
        my $sc   = PagiRS::SSE->open( $p, '/cap' );
        my $ev   = $sc->next_event(5) // {};
        my $sse  = eval { $J->decode( $ev->{data} // '' ) } // {};
        my $ws   = PagiRS::WS->connect( $p, path => '/cap' );
        my $m    = $ws->recv_message(5) // {};
        my $wsr  = eval { $J->decode( $m->{data} // '' ) } // {};
        $ws->wait_close(3);

        for my $r ( [ http => $http ], [ sse => $sse ], [ websocket => $wsr ] ) {
            my ( $type, $d ) = @$r;
            is $d->{type}, $type, "$www: $type: the app ran on a $type scope";
            is_deeply $d->{pagi}, { version => $core, spec_version => $www },
              "$www: $type: scope pagi is {version => $core, spec_version => $www}";
            is_deeply $d->{missing}, [], "$www: $type: pagi.connection is blessed and can every method checked"
              or diag explain $d;
            is $d->{spec_ok}, $ok,
              "$www: $type: the spec_version >= 0.6 check " . ( $ok ? 'passes' : 'refuses the 0.3 server' );
        }
        for my $r ( [ http => $http ], [ sse => $sse ] ) {
            my ( $type, $d ) = @$r;
            is "$d->{close_code_defined}/$d->{close_reason_defined}", '0/0',
              "$www: $type: close_code and close_reason are undef";
        }
    }
};

# ---------------------------------------------------------------------------
# 2. on_end / end_future / disconnect_future
# ---------------------------------------------------------------------------
subtest 'clean end: on_complete + on_end (undef, undef), end_future undef, disconnect_future stays pending' => sub {
    my $res = http_request( $port, 'GET', '/end?clean' );
    is "$res->{status} " . ( $res->{body} // '' ), '200 clean', 'response delivered';
    my $o = rec_wait('end-clean') // {};
    is $o->{after_final_send}{connected}, 0, 'right after the final body send: is_connected is false';
    is $o->{after_final_send}{complete}, 1, 'right after the final body send: response_complete is true';
    is $o->{notified_inside_send}, 0, 'no notification ran inside the final $send';
    is $o->{end_future_value}, 'done: undef', 'a second end_future resolves with undef';
    my @log = @{ $o->{log} // [] };
    is join( ',', sort map { $_->{what} } @log ), 'end_future,on_complete,on_end',
      'on_complete, on_end and end_future fired; on_disconnect and disconnect_future did not';
    my ($end) = grep { $_->{what} eq 'on_end' } @log;
    is_deeply $end && $end->{args}, [ undef, undef ], 'on_end got (undef, undef)';
    my ($eff) = grep { $_->{what} eq 'end_future' } @log;
    is $eff && $eff->{args}[0], 'done: undef', 'end_future resolved with undef';
    is $o->{df}, 'pending', 'disconnect_future is still pending after a clean end';
    is $o->{df_cancelled}, 'cancelled', 'the cancelled disconnect_future stays cancelled';
    is $o->{ef_cancelled}, 'cancelled', 'the cancelled end_future stays cancelled';
    is $o->{ef_other}, 'done: undef', 'another end_future taken before still resolved';
    ok @log, 'some notification ran' or return;
    is_deeply [ @{ $log[0]{state} }{qw(connected reason complete)} ], [ 0, undef, 1 ],
      'facts were set before the first notification (connected 0, reason undef, complete 1)';
    is_deeply $o->{late}, [ [ 'on_end', undef, undef ], ['on_complete'] ],
      'late registration: on_end runs at once with (undef, undef), on_complete runs, on_disconnect does not';
    is $o->{late_end_future},        'done: undef', 'late end_future is already resolved with undef';
    is $o->{late_disconnect_future}, 'pending',     'late disconnect_future stays pending';
    is_deeply [ @{ $o->{final} }{qw(connected reason detail complete)} ], [ 0, undef, undef, 1 ],
      'final facts: not connected, no reason, no detail, complete';
};

subtest 'abnormal end: on_disconnect + on_end (client_closed), isolated futures, late registration' => sub {
    my ( $s, $got ) = open_until( $port, get_req('/end?abnormal'), qr/part1/ );
    like $got, qr/part1/, 'client got the first chunk';
    ok rec_wait('end-abnormal-ready'), 'the app is waiting mid-response';
    close $s;
    my $o = rec_wait( 'end-abnormal', 6 ) // {};
    is $o->{df_other}, 'done: client_closed',
      'a disconnect_future resolved with client_closed although another one was cancelled';
    is $o->{ef_other}, 'done: client_closed', 'an end_future resolved with client_closed although another was cancelled';
    is $o->{df_cancelled}, 'cancelled', 'the cancelled disconnect_future stays cancelled';
    is $o->{ef_cancelled}, 'cancelled', 'the cancelled end_future stays cancelled';
    my @log = @{ $o->{log} // [] };
    is join( ',', sort map { $_->{what} } @log ), 'disconnect_future,end_future,on_disconnect,on_end',
      'disconnect_future, on_disconnect, end_future and on_end fired; on_complete did not';
    my ($od) = grep { $_->{what} eq 'on_disconnect' } @log;
    my ($oe) = grep { $_->{what} eq 'on_end' } @log;
    is $od && $od->{args}[0], 'client_closed', 'on_disconnect got client_closed';
    ok $od && defined $od->{args}[1] && length $od->{args}[1], 'on_disconnect got a detail';
    is $oe && $oe->{args}[0], 'client_closed', 'on_end got client_closed';
    is $oe && $oe->{args}[1], $od && $od->{args}[1], 'on_end got the same detail';
    ok @log, 'some notification ran' or return;
    my $st = $log[0]{state};
    is "$st->{connected}/" . ( $st->{reason} // 'undef' ) . "/$st->{complete}", '0/client_closed/0',
      "facts were set before the first notification ($log[0]{what})";
    ok defined $st->{detail}, 'disconnect_detail was set before the first notification too';
    is scalar(@{ $o->{late} // [] }), 2, 'late registration: two callbacks ran at once' or diag explain $o->{late};
    my %late = map { $_->[0] => $_ } @{ $o->{late} // [] };
    is $late{on_end} && $late{on_end}[1], 'client_closed', 'late on_end ran at once with client_closed';
    is $late{on_disconnect} && $late{on_disconnect}[1], 'client_closed', 'late on_disconnect ran at once';
    ok !$late{on_complete}, 'late on_complete did not run';
    is $o->{late_end_future},        'done: client_closed', 'late end_future already resolved with client_closed';
    is $o->{late_disconnect_future}, 'done: client_closed', 'late disconnect_future already resolved with client_closed';
};

# ---------------------------------------------------------------------------
# 3. disconnect_detail
# ---------------------------------------------------------------------------
my @secret_headers = ( "X-Secret: $SECRET_HEADER", "Authorization: $SECRET_TOKEN" );

sub no_secrets {
    my ( $detail, $what ) = @_;
    $detail //= '';
    unlike $detail, qr/\Q$SECRET_HEADER\E/, "$what: detail does not contain the header value";
    unlike $detail, qr/s3cr3t/i, "$what: detail does not contain the credentials";
    unlike $detail, qr/\Q$SECRET_BODY\E/, "$what: detail does not contain the request body";
}

subtest 'disconnect_detail: client_closed, body_too_large, server_error; never request data' => sub {
    # client_closed
    my $body = $SECRET_BODY x 3;
    my $req = "POST /detail-closed HTTP/1.1\r\nHost: 127.0.0.1\r\n" . join( '', map { "$_\r\n" } @secret_headers )
      . "Content-Length: " . length($body) . "\r\n\r\n$body";
    my ( $s, $got ) = open_until( $port, $req, qr/started/ );
    like $got, qr/started/, 'client_closed: response under way';
    close $s;
    my $o = rec_wait( 'detail-closed', 6 ) // {};
    is $o->{end}, 'client_closed', 'client_closed: end_future resolved with client_closed';
    is $o->{body_len}, length $body, 'client_closed: the app read the whole body';
    my $d = $o->{state}{detail};
    ok defined $d && length $d, 'client_closed: detail defined (' . ( $d // 'undef' ) . ')';
    no_secrets( $d, 'client_closed' );

    # body_too_large: a chunked upload past --max-body-size 1024
    my $big = $SECRET_BODY x 200;    # 2800 bytes
    my $breq = "POST /detail-big HTTP/1.1\r\nHost: 127.0.0.1\r\n" . join( '', map { "$_\r\n" } @secret_headers )
      . "Transfer-Encoding: chunked\r\n\r\n";
    $breq .= sprintf( "%x\r\n%s\r\n", length $_, $_ ) for unpack '(a700)*', $big;
    $breq .= "0\r\n\r\n";
    my $raw = raw_request( $tport, $breq, timeout => 5 );
    my $res = parse_response($raw) // {};
    is $res->{status}, 413, 'body_too_large: the client gets 413';
    my $b = rec_wait( 'detail-big', 6 ) // {};
    is $b->{types} && $b->{types}[-1], 'http.disconnect', 'body_too_large: the app\'s receive ended with http.disconnect'
      or diag explain $b;
    ok $b->{len} <= 1024, "body_too_large: the app got no more than the limit ($b->{len} bytes)";
    is $b->{state}{reason}, 'body_too_large', 'body_too_large: disconnect_reason';
    my $bd = $b->{state}{detail};
    like $bd // '', qr/max-body-size.*1024/, 'body_too_large: detail names the limit (' . ( $bd // 'undef' ) . ')';
    is_deeply $b->{callbacks}, [ [ 'body_too_large', $bd ] ], 'body_too_large: on_disconnect got reason and detail';
    no_secrets( $bd, 'body_too_large' );

    # server_error: the app dies after starting the response
    my $dreq = "POST /detail-die HTTP/1.1\r\nHost: 127.0.0.1\r\n" . join( '', map { "$_\r\n" } @secret_headers )
      . "Content-Length: " . length($body) . "\r\n\r\n$body";
    my $draw = raw_request( $port, $dreq, timeout => 5 );
    like $draw, qr/^HTTP\/1\.1 200 /, 'server_error: the response had started';
    my $e = rec_wait( 'detail-die', 5 ) // {};
    is $e->{args} && $e->{args}[0], 'server_error', 'server_error: on_disconnect reason';
    like $e->{args} && $e->{args}[1], qr/detail-test-exception/, 'server_error: detail carries the exception text';
    is $e->{state}{detail}, $e->{args} && $e->{args}[1], 'server_error: disconnect_detail is the same';
    no_secrets( $e->{args} && $e->{args}[1], 'server_error' );
};

# ---------------------------------------------------------------------------
# 4. No notification inside the app's own $send
# ---------------------------------------------------------------------------
subtest 'notifications never run inside $send (parked send, and a stream of small sends)' => sub {
    # A send parked on backpressure when the client leaves.
    my ( $s, $got ) = open_until( $tport, get_req('/in-send?parked'), qr/\r\n\r\n/ );
    ok rec_wait( 'in-send-parked-ready', 10 ), 'parked: a send stays pending (the client does not read)';
    close $s;
    my $o = rec_wait( 'in-send-parked', 8 ) // {};
    is $o->{parked}, 'resolved', 'parked: the parked send resolved';
    my @log = @{ $o->{log} // [] };
    is join( ',', sort map { $_->{what} } @log ), 'disconnect_future,end_future,on_disconnect,on_end,parked_send,receive',
      'parked: every notification ran once' or diag explain \@log;
    is_deeply [ map { "$_->{what}=$_->{in_send}" } grep { $_->{in_send} } @log ], [],
      'parked: none of them ran while the app was inside $send';

    # Small sends every 10 ms while the client goes away: the send that
    # finds the connection gone must not run notifications itself.
    my ( $s2, $got2 ) = open_until( $port, get_req('/in-send?stream'), qr/s{1024}\n.*s{1024}\n/s );
    ok rec_wait( 'in-send-stream-ready', 5 ), 'stream: the app is streaming';
    close $s2;
    my $o2 = rec_wait( 'in-send-stream', 8 ) // {};
    my @log2 = @{ $o2->{log} // [] };
    is join( ',', sort map { $_->{what} } @log2 ), 'disconnect_future,end_future,on_disconnect,on_end,receive',
      'stream: every notification ran once' or diag explain \@log2;
    is_deeply [ map { "$_->{what}=$_->{in_send}" } grep { $_->{in_send} } @log2 ], [],
      'stream: none of them ran while the app was inside $send';
};

# ---------------------------------------------------------------------------
# 5. A dying callback does not stop the others
# ---------------------------------------------------------------------------
subtest 'a callback that dies does not stop the next one' => sub {
    my ( $s, $got ) = open_until( $port, get_req('/cb-die?abnormal'), qr/part1/ );
    ok rec_wait('cb-die-abnormal-ready'), 'abnormal: the app is mid-response';
    close $s;
    my $o = rec_wait( 'cb-die-abnormal', 6 ) // {};
    is_deeply $o->{ran}, [ 'on_disconnect#2', 'on_end#2' ],
      'abnormal: the second on_disconnect and the second on_end ran after the first ones died';
    is $o->{end_future}, 'client_closed', 'abnormal: end_future still resolved';

    my $res = http_request( $port, 'GET', '/cb-die?clean' );
    is $res->{status}, 200, 'clean: response delivered';
    my $c = rec_wait( 'cb-die-clean', 6 ) // {};
    is_deeply [ sort @{ $c->{ran} // [] } ], [ 'on_complete#2', 'on_end#2' ],
      'clean: the second on_complete and the second on_end ran after the first ones died';
    is $c->{state}{complete}, 1, 'clean: the scope still counts as complete';
    is http_request( $port, 'GET', '/ok' )->{status}, 200, 'the server still serves';
};

# ---------------------------------------------------------------------------
# 6. A send parked on backpressure settles at the disconnect
# ---------------------------------------------------------------------------
subtest 'a $send parked on backpressure resolves when the client disconnects' => sub {
    my ( $s, $got ) = open_until( $tport, get_req('/parked'), qr/\r\n\r\n/ );
    ok rec_wait( 'parked-ready', 10 ), 'a send is parked (64 KiB chunks, high water 16384, client not reading)';
    my $t0 = time;
    close $s;
    my $o = rec_wait( 'parked', 8 ) // {};
    ok !$o->{never_parked}, 'the app saw a parked send';
    is $o->{parked_state}{connected}, 1, 'while parked the scope was still connected';
    is $o->{outcome}, 'settled', 'the parked send resolved (did not fail, did not hang)';
    my $at = $o->{at_settle} // {};
    is $at->{future}, 'done: undef', 'it was done, not failed';
    is $at->{connected}, 0, 'when it resolved, is_connected was already false';
    is $at->{reason}, 'client_closed', 'when it resolved, disconnect_reason was already client_closed';
    is $at->{callbacks_ran}, 1, 'when it resolved, on_disconnect had already run';
    ok defined $at->{t} && $at->{t} - $t0 < 2, sprintf( 'promptly (%.2f s)', ( $at->{t} // 99 ) - $t0 );
};

# ---------------------------------------------------------------------------
# 7. abort
# ---------------------------------------------------------------------------
subtest 'abort before the response started: no status line, app_abort, later sends resolve, nothing logged' => sub {
    my $mark = length $main->output;
    my ( $raw, $closed, $dt ) = exchange( $port, get_req('/abort-before') );
    is $raw, '', 'the client got nothing at all';
    ok $closed && $dt < 1.5, sprintf( 'the connection was closed at once (closed=%d, %.2f s)', $closed, $dt );
    my $o = rec_wait('abort-before') // {};
    is $o->{after_abort}{connected}, 0, 'right after abort: is_connected false';
    is $o->{after_abort}{reason}, 'app_abort', 'right after abort: reason app_abort';
    is $o->{after_abort}{detail}, 'app-said-no', "right after abort: detail is the app's string";
    is $o->{callbacks_inside_abort}, 0, 'no callback ran inside abort()';
    is $o->{start_send}, 'done: undef', 'a later http.response.start resolves at once';
    is $o->{body_send}, '', 'a later http.response.body resolves';
    is_deeply $o->{callbacks}, [ [ 'on_disconnect', 'app_abort', 'app-said-no' ], [ 'on_end', 'app_abort', 'app-said-no' ] ],
      'on_disconnect and on_end got (app_abort, detail) from the loop';
    is $o->{final}{started}, 0, 'the later sends did not start a response';

    # Pipelined after a request that is answered: that answer, then nothing.
    unlink "$dir/abort-before";
    my ( $raw2, $closed2, $dt2 ) = exchange( $port, get_req('/ok') . get_req('/abort-before') );
    my $first = parse_response($raw2) // {};
    is "$first->{status} " . ( $first->{body} // '' ), '200 ok', 'pipelined: the first request is answered';
    is $first->{rest}, '', 'pipelined: nothing follows it';
    ok $closed2 && $dt2 < 1.5, sprintf( 'pipelined: then the connection closed (closed=%d, %.2f s)', $closed2, $dt2 );
    ok rec_wait('abort-before'), 'pipelined: the aborting app ran';
    sleep 0.3;
    my $log = output_since( $main, $mark );
    unlike $log, qr/\bERROR\b/, 'no error logged for the aborts' or diag $log;
    unlike $log, qr/app-said-no/, "the app's detail is not logged as an error";
};

subtest 'abort mid-stream: truncated chunked body, connection closes at once, queue dropped' => sub {
    # The client reads the head and a little, then stops reading so a queue builds.
    my $mark = length $tight->output;
    my ( $s, $got ) = open_until( $tport, get_req('/abort-mid'), qr/\r\n\r\n.{1000}/s );
    like $got, qr/\AHTTP\/1\.1 200 /, 'the response started';
    my $a = rec_wait( 'abort-mid-aborted', 10 ) // {};
    ok $a->{accepted}, "the app queued $a->{accepted} bytes, then aborted";
    my $t0 = time;
    my ( $all, $closed ) = read_sock( $s, undef, 4, $got );
    my $dt = time - $t0;
    ok $closed, 'the server closed the connection';
    ok $dt < 2, sprintf( 'promptly (%.2f s)', $dt );
    my $res = parse_response($all) // {};
    is $res->{status}, 200, 'status 200';
    like join( ',', @{ $res->{headers}{'transfer-encoding'} // [] } ), qr/chunked/, 'chunked';
    ok !$res->{complete}, 'no terminating 0-chunk: the body is truncated';
    ok length( $res->{body} // '' ) < $a->{accepted},
      sprintf( 'queued data was dropped (%d of %d bytes arrived)', length( $res->{body} // '' ), $a->{accepted} );
    my $o = rec_wait( 'abort-mid', 5 ) // {};
    is $o->{parked}, 1, 'a send was parked when the app aborted';
    is $o->{parked_outcome}, 'settled', 'the parked send resolved after abort';
    is "$o->{after_abort}{reason}/" . ( $o->{after_abort}{detail} // 'undef' ), 'app_abort/mid-stream',
      'reason app_abort, detail mid-stream';
    is $o->{later_send}, '', 'a later send is a no-op that resolves';
    sleep 0.2;
    unlike output_since( $tight, $mark ), qr/\bERROR\b/, 'no error logged for the abort'
      or diag output_since( $tight, $mark );
};

subtest 'abort after the end is a no-op' => sub {
    my $raw = raw_request( $port, get_req('/abort-after') . get_req( '/ok', 'Connection: close' ), timeout => 5 );
    my $r1 = parse_response($raw) // {};
    is "$r1->{status} " . ( $r1->{body} // '' ), '200 done', 'the response is whole';
    my $r2 = parse_response( $r1->{rest} // '' ) // {};
    is "$r2->{status} " . ( $r2->{body} // '' ), '200 ok', 'the connection stayed usable for the next request';
    my $o = rec_wait('abort-after') // {};
    is_deeply [ @{ $o->{after_first_abort} // {} }{qw(connected reason detail complete)} ], [ 0, undef, undef, 1 ],
      'right after abort: still a clean end (no reason, no detail, complete)';
    is_deeply [ @{ $o->{final} // {} }{qw(reason detail complete)} ], [ undef, undef, 1 ], 'later: still clean';
    is_deeply $o->{callbacks}, [ ['on_complete'] ], 'on_complete ran, on_disconnect never did';
};

subtest 'abort on an sse scope, before and after sse.start' => sub {
    my $mark = length $main->output;
    my ( $raw, $closed, $dt ) = exchange( $port, get_req( '/sse-abort-before', 'Accept: text/event-stream' ) );
    is $raw, '', 'before sse.start: the client got nothing';
    ok $closed && $dt < 1.5, sprintf( 'before sse.start: the connection was closed at once (%.2f s)', $dt );
    my $o = rec_wait('sse-abort-before') // {};
    is "$o->{after_abort}{reason}/" . ( $o->{after_abort}{detail} // 'undef' ), 'app_abort/sse-no',
      'before sse.start: app_abort with the detail';
    is $o->{start_send}, '', 'before sse.start: a later sse.start resolves (no-op)';
    is $o->{event_send}, '', 'before sse.start: a later sse.send resolves (no-op)';
    is_deeply $o->{receive}, { type => 'sse.disconnect', reason => 'app_abort' },
      'before sse.start: receive gives sse.disconnect app_abort';

    my $c = PagiRS::SSE->open( $port, '/sse-abort-after' );
    is $c->status, 200, 'after sse.start: the stream started';
    is( ( $c->next_event(3) // {} )->{data}, 'one', 'after sse.start: the event arrived' );
    ok $c->wait_tcp_eof(3), 'after sse.start: the connection closed';
    ok !$c->complete, 'after sse.start: no chunked terminator';
    unlike $c->wire, qr/0\r\n\r\n\z/, 'after sse.start: the wire does not end with 0 CRLF CRLF';
    my $a = rec_wait('sse-abort-after') // {};
    is "$a->{after_abort}{reason}/" . ( $a->{after_abort}{detail} // 'undef' ), 'app_abort/sse-bye',
      'after sse.start: app_abort with the detail';
    is $a->{receive_ready_inside_abort}, 0, 'after sse.start: the pending receive was not settled inside abort()';
    is_deeply $a->{receive}, { type => 'sse.disconnect', reason => 'app_abort' },
      'after sse.start: the pending receive got sse.disconnect app_abort';
    is $a->{event_send}, '', 'after sse.start: a later sse.send resolves (no-op)';
    sleep 0.2;
    unlike output_since( $main, $mark ), qr/\bERROR\b/, 'no error logged for the sse aborts'
      or diag output_since( $main, $mark );
};

# ---------------------------------------------------------------------------
# 8. Receives after the end, and their limit
# ---------------------------------------------------------------------------
subtest 'receives after the end: the disconnect event up to --max-disconnect-receives, then failure' => sub {
    is http_request( $tport, 'GET', '/receives?n=7' )->{status}, 200, 'limit 5: response delivered';
    my $o = rec_wait('receives-7') // {};
    my @got = @{ $o->{got} // [] };
    is_deeply [ @got[ 0 .. 4 ] ], [ ('http.disconnect') x 5 ], 'limit 5: receives 1..5 give http.disconnect';
    like $got[5] // '', qr/^failed: /, 'limit 5: the 6th fails';
    like $got[6] // '', qr/^failed: /, 'limit 5: so does the 7th';

    is http_request( $port, 'GET', '/receives?n=102' )->{status}, 200, 'default: response delivered';
    my $d = rec_wait('receives-102') // {};
    my @dg = @{ $d->{got} // [] };
    is scalar( grep { $_ eq 'http.disconnect' } @dg[ 0 .. 99 ] ), 100, 'default: receives 1..100 give http.disconnect';
    like $dg[100] // '', qr/^failed: /, 'default: the 101st fails';

    # 0: no bound, as the reference server documents it.
    my $unbounded = start_server( '--max-disconnect-receives', 0, $app );
    is http_request( $unbounded->port, 'GET', '/receives?n=150' )->{status}, 200, '0: response delivered';
    my @ug = @{ ( rec_wait('receives-150') // {} )->{got} // [] };
    is scalar( grep { $_ eq 'http.disconnect' } @ug ), 150, '0: all 150 receives give http.disconnect';
    unlike $unbounded->output, qr/ERROR/, '0: nothing logged';
    $unbounded->stop('TERM');
};

# ---------------------------------------------------------------------------
# 9. Body shape
# ---------------------------------------------------------------------------
subtest 'body shape: file/fh after inline bytes fails under 0.6 (app finishes inline), allowed under 0.3' => sub {
    for my $kind (qw(file fh)) {
        my $res = http_request( $port, 'GET', "/shape?$kind" );
        is "$res->{status} " . ( $res->{body} // '' ), '200 inline;end', "0.6 $kind: the client gets the inline body";
        my $o = rec_wait("shape-$kind-0.6") // {};
        isnt $o->{err} // '', '', "0.6 $kind: the $kind event failed ($o->{err})";
        is_deeply [ @{ $o->{after} // {} }{qw(connected started complete)} ], [ 1, 1, 0 ],
          "0.6 $kind: the response was left as it was (started, not complete)";
        is $o->{finish}, '', "0.6 $kind: the app finished inline";

        my $lres = http_request( $lport, 'GET', "/shape?$kind" );
        is "$lres->{status} " . ( $lres->{body} // '' ), "200 inline;FILE-BYTES\n",
          "0.3 $kind: the file bytes follow the inline bytes";
        my $l = rec_wait("shape-$kind-0.3") // {};
        is $l->{err}, '', "0.3 $kind: the $kind event resolved";
        is $l->{after}{complete}, 1, "0.3 $kind: and completed the response";
    }
};

# ---------------------------------------------------------------------------
# 10. Trailers
# ---------------------------------------------------------------------------
subtest 'trailers: declared, final body, then http.response.trailers' => sub {
    my $raw = raw_request( $port, get_req( '/trailers', 'TE: trailers' ) . get_req( '/ok', 'Connection: close' ),
        timeout => 5 );
    my $res = parse_response($raw) // {};
    is $res->{status}, 200, 'status 200';
    like join( ',', @{ $res->{headers}{'transfer-encoding'} // [] } ), qr/chunked/, 'chunked';
    like join( ',', @{ $res->{headers}{trailer} // [] } ), qr/\bx-checksum\b/i, 'a Trailer header names x-checksum';
    is $res->{body}, 'payload', 'body';
    is_deeply $res->{trailers}, { 'x-checksum' => 'abc123' }, 'the trailer arrives after the last chunk';
    ok $res->{complete}, 'the response ends at the trailers';
    my $next = parse_response( $res->{rest} // '' ) // {};
    is "$next->{status} " . ( $next->{body} // '' ), '200 ok', 'the pipelined request is answered after it';
    my $o = rec_wait('trailers') // {};
    is_deeply [ @{ $o->{after_final_body} // {} }{qw(connected complete)} ], [ 1, 0 ],
      'after the final body: not yet complete (trailers are the terminal event)';
    is_deeply [ @{ $o->{after_trailers} // {} }{qw(connected complete)} ], [ 0, 1 ], 'after the trailers: complete';
};

# ---------------------------------------------------------------------------
# 11. SSE refusal
# ---------------------------------------------------------------------------
subtest 'sse refusal with http.response.* (0.6)' => sub {
    my $c = PagiRS::SSE->open( $port, '/sse-refuse' );
    is $c->status, 404, 'status 404';
    is $c->header('x-app'), 'refused', "the app's header";
    is $c->header('content-type'), 'text/plain', "the app's content-type, not text/event-stream";
    ok !defined $c->header('cache-control'), 'no SSE headers added';
    like $c->header('connection') // '', qr/\bclose\b/i, 'Connection: close';
    ok $c->wait_eof(3) && $c->complete, 'the body is complete';
    is $c->raw, 'no stream here', 'body';
    ok $c->wait_tcp_eof(3), 'the connection closes after it';
    my $o = rec_wait('sse-refuse') // {};
    is $o->{first}, 'sse.request', 'first receive sse.request';
    is $o->{pending_ready_before}, 0, 'a receive was pending during the refusal';
    is_deeply $o->{pending}, { type => 'http.disconnect' }, 'the pending receive got http.disconnect (no sse.disconnect)';
    is_deeply $o->{later}, { type => 'http.disconnect' }, 'a receive after the refusal gets http.disconnect';
    like $o->{sse_send_after}  // '', qr/refus|after/i, 'sse.send after the refusal fails';
    like $o->{sse_start_after} // '', qr/./, 'sse.start after the refusal fails';
    is_deeply $o->{callbacks}, [ ['on_complete'], [ 'on_end', undef, undef ] ],
      'the refusal is a clean end: on_complete and on_end, no on_disconnect';

    my $l = PagiRS::SSE->open( $port, '/sse-late-http' );
    is $l->status, 200, 'late http.response.*: the stream is 200';
    my $e = $l->next_event(3) // {};
    my $r = eval { $J->decode( $e->{data} // '' ) } // {};
    like $r->{start} // '', qr/after sse\.start/, 'http.response.start after sse.start fails';
    isnt $r->{body} // '', '', 'http.response.body after sse.start fails';
    ok $l->wait_eof(3) && $l->complete, 'the stream still ends properly';

    my $u = PagiRS::SSE->open( $port, '/sse-old-refuse' );
    is $u->status, 404, '0.6: the app refused with http.response.* instead';
    my $uo = rec_wait('sse-old-refuse-0.6') // {};
    like $uo->{start} // '', qr/unrecogni[sz]ed/i, '0.6: sse.http.response.start fails as unrecognized';

    my $v = PagiRS::SSE->open( $lport, '/sse-old-refuse' );
    is $v->status, 404, '0.3: sse.http.response.start refuses';
    ok $v->wait_eof(3), '0.3: body ends';
    is $v->raw, 'refused (sse.http)', '0.3: with the sse.http.response.body';
    my $vo = rec_wait('sse-old-refuse-0.3') // {};
    is "$vo->{start}|" . ( $vo->{body} // 'undef' ), '|', '0.3: both sse.http.response events resolve';
};

# ---------------------------------------------------------------------------
# 12. SSE return without sse.close
# ---------------------------------------------------------------------------
subtest 'sse: returning without sse.close is incomplete under 0.6, clean under 0.3' => sub {
    my $mark = length $main->output;
    my $c = PagiRS::SSE->open( $port, '/sse-return' );
    is( ( $c->next_event(3) // {} )->{data}, 'bye', '0.6: the event arrived' );
    ok $c->wait_tcp_eof(3), '0.6: the connection closes';
    ok !$c->complete, '0.6: the stream was cut (not complete)';
    unlike $c->wire, qr/0\r\n\r\n/, '0.6: no chunked terminator on the wire';
    my $o = rec_wait('sse-return-0.6') // {};
    is $o->{event}, 'on_disconnect', '0.6: on_disconnect fired (not on_complete)';
    is $o->{args} && $o->{args}[0], 'server_error', '0.6: with server_error';
    ok wait_output_since( $main, $mark, qr/\bERROR\b[^\n]*(?:incomplete|without sse\.close)/, 3 ),
      '0.6: an error is logged for the incomplete stream'
      or diag output_since( $main, $mark );

    my $l = PagiRS::SSE->open( $lport, '/sse-return' );
    ok $l->wait_eof(3), '0.3: the stream ends';
    ok $l->complete, '0.3: with the terminator';
    like $l->wire, qr/0\r\n\r\n\z/, '0.3: wire ends with 0 CRLF CRLF';
    is $l->raw, "data: bye\n\n", '0.3: body';
    my $lo = rec_wait('sse-return-0.3') // {};
    is $lo->{event}, 'on_complete', '0.3: on_complete fired';
};

# ---------------------------------------------------------------------------
# 13. sse.disconnect before sse.start
# ---------------------------------------------------------------------------
subtest 'sse.disconnect arrives before sse.start' => sub {
    my $s = connect_port($port);
    $s->syswrite( get_req( '/sse-wait-before', 'Accept: text/event-stream' ) );
    my $w = rec_wait( 'sse-wait-before', 5, qr/waiting/ ) // {};
    is_deeply $w->{first}, { type => 'sse.request', body => '', more => 0 }, 'the app got sse.request';
    abort_close($s);    # a FIN alone would be a half-close (t/45-framing-hardening.t)
    my $e = rec_wait( 'sse-wait-before', 5, qr/ended/ ) // {};
    is_deeply $e->{event}, { type => 'sse.disconnect', reason => 'client_closed' },
      'its pending receive got sse.disconnect client_closed';
    is $e->{state}{started}, 0, 'no response had started';
};

# ---------------------------------------------------------------------------
# 14. sse.keepalive before sse.start
# ---------------------------------------------------------------------------
subtest 'sse.keepalive before sse.start: fails under 0.6, takes effect at start under 0.3' => sub {
    my $c = PagiRS::SSE->open( $port, '/sse-early-ka' );
    ok $c->wait_eof(3), '0.6: stream ends';
    my $o = rec_wait('sse-early-ka-0.6') // {};
    like $o->{err} // '', qr/before sse\.start/, '0.6: the early sse.keepalive failed';
    is $c->raw, "data: done\n\n", '0.6: no keepalive comments on the idle stream';

    my $l = PagiRS::SSE->open( $lport, '/sse-early-ka' );
    ok $l->wait_eof(3), '0.3: stream ends';
    my $lo = rec_wait('sse-early-ka-0.3') // {};
    is $lo->{err}, '', '0.3: the early sse.keepalive resolved';
    my $n = () = $l->raw =~ /^:\n\n/mg;
    ok $n >= 2, "0.3: keepalive comments on the idle stream after sse.start ($n)";
    like $l->raw, qr/\A(?::\n\n)+data: done\n\n\z/, '0.3: comments, then the event';
};

for my $s ( [ main => $main ], [ legacy => $legacy ], [ tight => $tight ] ) {
    ok $s->[1]->is_running, "$s->[0] server still running";
    is $s->[1]->stop( 'TERM', 10 ), 0, "$s->[0] server exits 0";
}

done_testing;
