package PagiRS::Browser;

# A small W3C WebDriver client for the browser tests: runs chromedriver on a
# free loopback port, opens one headless Chromium session, and lets a test
# load pages, run JavaScript in them and wait for a JS condition.  Core
# modules only (HTTP::Tiny, JSON::PP).
#
#   my $why = PagiRS::Browser->missing;        # undef, or what to install
#   my $b   = PagiRS::Browser->new;             # dies with diagnostics
#   $b->get("http://127.0.0.1:$port/");
#   my $v = $b->execute('return document.title');
#   my $ok = $b->wait_for('window.done === true', timeout => 5);
#   $b->quit;                                   # also on DESTROY / END

use strict;
use warnings;
use Carp qw(croak);
use File::Temp qw(tempfile);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

our $APT_LINE = 'apt-get install -y chromium chromium-driver';

# Flags for running under CI: headless, as root (which needs --no-sandbox),
# without a GPU, and without relying on a large /dev/shm (containers give
# 64 MB, too little for Chromium's shared memory).
our @CHROME_ARGS = qw(--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage);

my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;

# Drivers still running, so END can stop them if an object is never destroyed
# (e.g. the test died while a global held it).
my %LIVE;

# ---------------------------------------------------------------------------
# Finding the programs
# ---------------------------------------------------------------------------

sub _which {
    my ($prog) = @_;
    for my $dir ( split /:/, $ENV{PATH} // '' ) {
        return "$dir/$prog" if length $dir && -f "$dir/$prog" && -x _;
    }
    return;
}

# The chromedriver to run: on PATH, else /usr/bin/chromedriver.
sub driver_path {
    return _which('chromedriver') // ( -x '/usr/bin/chromedriver' ? '/usr/bin/chromedriver' : undef );
}

# The Chromium binary, if we can name it (chromedriver also finds it itself).
sub chromium_path {
    for my $name (qw(chromium chromium-browser google-chrome)) {
        my $p = _which($name);
        return $p if $p;
    }
    return -x '/usr/bin/chromium' ? '/usr/bin/chromium' : undef;
}

# undef when chromedriver and Chromium are both there, else a message naming
# what is missing and how to install it.
sub missing {
    my @missing;
    push @missing, 'chromedriver' unless driver_path();
    push @missing, 'chromium' unless chromium_path();
    return undef unless @missing;
    return "not found: @missing (install with: $APT_LINE)";
}

# ---------------------------------------------------------------------------
# Life cycle
# ---------------------------------------------------------------------------

# Start chromedriver and open a session.  Options: timeout (seconds for any
# one WebDriver call, default 15), args (Chromium flags, default
# @CHROME_ARGS).  Dies with the driver's log when something fails.
sub new {
    my ( $class, %o ) = @_;
    my $why = $class->missing;
    croak "PagiRS::Browser: $why" if $why;

    my $self = bless {
        timeout => $o{timeout} // 15,
        args    => $o{args} // [@CHROME_ARGS],
    }, $class;

    my ( $log_fh, $log ) = tempfile( 'chromedriver-XXXXXX', TMPDIR => 1, SUFFIX => '.log', UNLINK => 1 );
    close $log_fh;
    $self->{log} = $log;

    # A port that was free a moment ago; chromedriver fails fast (and we
    # retry) if something took it in between.
    my $last_error;
    for my $attempt ( 1 .. 3 ) {
        my $port = _free_port();
        my $pid  = $self->_spawn_driver($port);
        if ( _wait_ready( $port, $pid ) ) {
            @$self{qw(port pid)} = ( $port, $pid );
            $LIVE{$pid} = 1;
            _exit_on_signals();
            last;
        }
        $last_error = "chromedriver on port $port did not become ready";
        _kill_wait($pid);
    }
    croak "PagiRS::Browser: $last_error; its log:\n" . $self->driver_log unless $self->{pid};

    $self->{http} = HTTP::Tiny->new( timeout => $self->{timeout}, agent => 'pagi-rs-tests' );

    my %chrome = ( args => $self->{args} );
    my $bin = chromium_path();
    $chrome{binary} = $bin if $bin;
    # Chromium's first launch on a fresh machine (CI) builds its caches and
    # profile, and under a parallel test run it once took longer than one
    # call's timeout: the session gets three times as long, and a second
    # try, which finds the caches warm.
    my ( $res, $err );
    for my $attempt ( 1 .. 2 ) {
        local $self->{http} = HTTP::Tiny->new( timeout => 3 * $self->{timeout}, agent => 'pagi-rs-tests' );
        $res = eval {
            $self->_call(
                POST => '/session',
                { capabilities => { alwaysMatch => { browserName => 'chrome', 'goog:chromeOptions' => \%chrome } } },
            );
        };
        last if $res;
        $err = $@;
    }
    if ( !$res ) {
        $self->_stop_driver;
        croak "PagiRS::Browser: could not start Chromium: $err\nchromedriver log:\n" . $self->driver_log;
    }
    $self->{session} = $res->{sessionId}
      // croak "PagiRS::Browser: no sessionId in the new-session answer: " . $JSON->encode($res);
    $self->{browser_version} = $res->{capabilities}{browserVersion};

    # Bounds inside the browser, so a hung page or script ends in an error
    # instead of waiting for HTTP::Tiny's timeout.
    my $ms = int( $self->{timeout} * 1000 * 2 / 3 );
    $self->_session_call( POST => '/timeouts', { script => $ms, pageLoad => $ms, implicit => 0 } );
    return $self;
}

sub browser_version { $_[0]{browser_version} }

# Everything chromedriver wrote so far (for diagnostics).
sub driver_log {
    my ($self) = @_;
    open my $fh, '<', $self->{log} or return '(no log)';
    local $/;
    my $s = <$fh> // '';
    return length $s ? $s : '(empty)';
}

# End the session (closes Chromium) and stop chromedriver.  Idempotent.
sub quit {
    my ($self) = @_;
    if ( $self->{session} && $self->{pid} ) {
        # Best effort with a short timeout: killing the driver below is the
        # backstop, and quit must not hang a test that is already failing.
        local $self->{http} = HTTP::Tiny->new( timeout => 5 );
        eval { $self->_call( DELETE => "/session/$self->{session}" ) };
    }
    delete $self->{session};
    $self->_stop_driver;
    return;
}

sub DESTROY {
    my ($self) = @_;
    local ( $@, $!, $? );
    $self->quit;
}

END {
    local $?;
    _kill_wait($_) for keys %LIVE;
}

# A test stopped by a signal (Ctrl-C under prove, a closed pipe) would skip
# END and leave chromedriver and Chromium running: turn those signals into
# an exit, unless the test handles them itself.
sub _exit_on_signals {
    for my $sig (qw(INT TERM HUP PIPE)) {
        next if defined $SIG{$sig} && $SIG{$sig} ne '' && $SIG{$sig} ne 'DEFAULT';
        $SIG{$sig} = sub { $SIG{$sig} = 'DEFAULT'; exit 128 + ( $sig eq 'INT' ? 2 : $sig eq 'TERM' ? 15 : $sig eq 'HUP' ? 1 : 13 ) };
    }
}

# ---------------------------------------------------------------------------
# Driving the page
# ---------------------------------------------------------------------------

# Load $url and wait for the load event (bounded by the pageLoad timeout).
sub get {
    my ( $self, $url ) = @_;
    $self->_session_call( POST => '/url', { url => $url } );
    return $self;
}

sub current_url { $_[0]->_session_call( GET => '/url' ) }

# Run $script (a function body: use `return`) with @args as `arguments`;
# returns its result converted to Perl (JSON true/false become 1/0).
sub execute {
    my ( $self, $script, @args ) = @_;
    return _plain( $self->_session_call( POST => '/execute/sync', { script => $script, args => \@args } ) );
}

# Poll the JS expression $expr (not a function body) until it is truthy;
# returns its value, or undef on timeout.  Options: timeout (default 5 s),
# interval (default 0.05 s).  A script error counts as not yet true; the last
# one is kept in ->last_error for the diagnostics.
sub wait_for {
    my ( $self, $expr, %o ) = @_;
    my $timeout  = $o{timeout}  // 5;
    my $interval = $o{interval} // 0.05;
    my $deadline = time + $timeout;
    delete $self->{last_error};
    while (1) {
        my $v = eval { $self->execute("return ($expr);") };
        if ( my $err = $@ ) {
            $self->{last_error} = $err;
            # The session itself is gone: polling cannot recover.
            die $err if $err =~ /invalid session id|no such window|connection refused|chromedriver exited/i;
        }
        elsif ($v) {
            return $v;
        }
        return undef if time >= $deadline;
        sleep $interval;
    }
}

sub last_error { $_[0]{last_error} }

# Windows (tabs) of the session, e.g. for two clients of one page.
sub window_handle  { $_[0]->_session_call( GET => '/window' ) }
sub window_handles { $_[0]->_session_call( GET => '/window/handles' ) }

# Open a new tab and switch to it; returns its handle.
sub new_window {
    my ($self) = @_;
    my $r = $self->_session_call( POST => '/window/new', { type => 'tab' } );
    $self->switch_to( $r->{handle} );
    return $r->{handle};
}

# Close the current tab (then switch_to another before going on).
sub close_window {
    my ($self) = @_;
    $self->_session_call( DELETE => '/window' );
    return $self;
}

sub switch_to {
    my ( $self, $handle ) = @_;
    $self->_session_call( POST => '/window', { handle => $handle } );
    return $self;
}

# The browser console (errors from the page's scripts), when the driver
# offers it; [] if not.
sub console_log {
    my ($self) = @_;
    my $r = eval { $self->_session_call( POST => '/se/log', { type => 'browser' } ) };
    return ref $r eq 'ARRAY' ? $r : [];
}

# ---------------------------------------------------------------------------
# WebDriver protocol
# ---------------------------------------------------------------------------

sub _session_call {
    my ( $self, $method, $path, $body ) = @_;
    croak 'PagiRS::Browser: no session' unless $self->{session};
    return $self->_call( $method, "/session/$self->{session}$path", $body );
}

# One WebDriver command; returns the answer's `value`, dies with the W3C
# error name and message (or the HTTP failure) otherwise.
sub _call {
    my ( $self, $method, $path, $body ) = @_;
    die "WebDriver $method $path: chromedriver exited; its log:\n" . $self->driver_log . "\n"
      if $self->{pid} && !_running( $self->{pid} );
    my %req = ( headers => { 'Content-Type' => 'application/json; charset=utf-8' } );
    $req{content} = $JSON->encode($body) if defined $body;
    $req{content} //= '{}' if $method eq 'POST';
    my $res = $self->{http}->request( $method, "http://127.0.0.1:$self->{port}$path", \%req );
    my $data = eval { $JSON->decode( $res->{content} ) };
    if ( !$res->{success} ) {
        my $v = ref $data eq 'HASH' ? $data->{value} : undef;
        if ( ref $v eq 'HASH' && $v->{error} ) {
            my $msg = $v->{message} // '';
            $msg =~ s/\n\s*\(Session info:.*//s;    # chromedriver appends noise
            $msg =~ s/^\Q$v->{error}\E:\s*//;         # and repeats the error name
            die "WebDriver $method $path: $v->{error}: $msg\n";
        }
        # HTTP::Tiny reports its own failures (timeout, refused) as status 599.
        my $detail = $res->{status} == 599 ? $res->{content} : substr( $res->{content} // '', 0, 500 );
        $detail .= "\n(chromedriver has exited; its log:\n" . $self->driver_log . ")"
          if $self->{pid} && !_running( $self->{pid} );
        die "WebDriver $method $path: HTTP $res->{status} $res->{reason}: $detail\n";
    }
    die "WebDriver $method $path: answer is not JSON: " . substr( $res->{content} // '', 0, 500 ) . "\n"
      unless ref $data eq 'HASH';
    return $data->{value};
}

# JSON::PP booleans to 1/0, recursively, so tests can use is/is_deeply.
sub _plain {
    my ($v) = @_;
    return ref $v eq 'ARRAY' ? [ map { _plain($_) } @$v ]
      : ref $v eq 'HASH' ? { map { $_ => _plain( $v->{$_} ) } keys %$v }
      : JSON::PP::is_bool($v) ? ( $v ? 1 : 0 )
      : $v;
}

# ---------------------------------------------------------------------------
# The chromedriver process
# ---------------------------------------------------------------------------

sub _spawn_driver {
    my ( $self, $port ) = @_;
    my $driver = driver_path();
    my $pid    = fork // croak "fork: $!";
    if ( !$pid ) {
        # Own process group, so stopping it also stops the Chromium it runs.
        POSIX::setpgid( 0, 0 );
        open STDIN,  '<',  '/dev/null';
        open STDOUT, '>>', $self->{log};
        open STDERR, '>&', \*STDOUT;
        exec $driver, "--port=$port", '--allowed-ips=127.0.0.1', '--enable-chrome-logs' or POSIX::_exit(127);
    }
    return $pid;
}

# Poll /status until the driver ($pid) says it is ready (10 s at most).
sub _wait_ready {
    my ( $port, $pid ) = @_;
    my $http     = HTTP::Tiny->new( timeout => 2 );
    my $deadline = time + 10;
    while ( time < $deadline ) {
        my $res = $http->get("http://127.0.0.1:$port/status");
        if ( $res->{success} ) {
            my $d = eval { $JSON->decode( $res->{content} ) };
            return 1 if $d && $d->{value}{ready};
        }
        # Gone already (port taken, bad binary): no point waiting.
        return 0 unless _running($pid);
        sleep 0.05;
    }
    return 0;
}

sub _stop_driver {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    delete $LIVE{$pid};
    _kill_wait($pid);
}

# 1 while $pid (our child) runs.  Once it has been reaped this stays 0:
# waitpid then answers -1.
sub _running {
    my ($pid) = @_;
    return waitpid( $pid, WNOHANG ) == 0;
}

# Stop the driver and everything in its process group (the browser): TERM,
# up to 3 s for the driver to exit, then KILL for whatever is left -- also
# when the driver itself had already died and left Chromium behind.
sub _kill_wait {
    my ($pid) = @_;
    return unless $pid;
    kill 'TERM', -$pid, $pid;
    my $deadline = time + 3;
    while ( time < $deadline ) {
        last unless _running($pid);
        sleep 0.05;
    }
    kill 'KILL', -$pid, $pid;
    waitpid( $pid, WNOHANG );
}

sub _free_port {
    my $s = IO::Socket::INET->new( Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0, ReuseAddr => 1 )
      or croak "free port: $!";
    my $p = $s->sockport;
    close $s;
    return $p;
}

1;
