use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use File::Temp qw(tempdir);
use File::Path qw(make_path);
use File::Spec;
use Cwd qw(realpath);
use IO::Socket::INET;
use JSON::PP;
use Time::HiRes qw(time sleep);

# App loading: every form the CLI accepts, and every failure path (which must
# exit 1 with Perl's error text before the port is bound).

$ENV{PAGI_RS_BIN} = File::Spec->rel2abs( $ENV{PAGI_RS_BIN} ) if defined $ENV{PAGI_RS_BIN};

my $TMP = tempdir( CLEANUP => 1 );

sub spew {
    my ( $path, $text ) = @_;
    my ( undef, $dir ) = File::Spec->splitpath($path);
    make_path($dir) if length $dir && !-d $dir;
    open my $fh, '>', $path or die "write $path: $!";
    print $fh $text;
    close $fh;
    return $path;
}

# Start and wait for the startup line; returns the server (or undef + diag).
sub start_in {
    my ( $cwd, @args ) = @_;
    my $s = spawn_pagi( { cwd => $cwd }, '-p', 0, @args );
    if ( $s->wait_output( qr{listening on http://127\.0\.0\.1:(\d+)/}, 15 ) ) {
        ( $s->{port} ) = $s->output =~ m{listening on http://127\.0\.0\.1:(\d+)/};
        return $s;
    }
    diag "server did not start:\n" . $s->output;
    $s->stop( 'KILL', 5 );
    return undef;
}

my $APP_TEMPLATE = <<'PERL';
use strict; use warnings; use Future::AsyncAwait;
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    my $body = __BODY__;
    await $send->({type => 'http.response.start', status => 200, headers => [['content-type', 'text/plain']]});
    await $send->({type => 'http.response.body', body => $body, more => 0});
};
$app;
PERL

sub app_with_body {
    my ($expr) = @_;
    ( my $src = $APP_TEMPLATE ) =~ s/__BODY__/$expr/;
    return $src;
}

sub get_body {
    my ( $s, $path ) = @_;
    my $res = http_request( $s->port, 'GET', $path // '/' );
    return $res->{status} == 200 ? $res->{body} : "STATUS $res->{status}: " . ( $res->{body} // $res->{raw} // '' );
}

# ---------------------------------------------------------------------------
# Successful forms
# ---------------------------------------------------------------------------

subtest 'file .pl given by absolute path' => sub {
    my $app = write_app( app_with_body(q{'from-pl-file'}), 'plain_app.pl' );
    my $s = start_in( '/', $app ) or return fail('server started');
    is get_body($s), 'from-pl-file', '.pl app answers with its body';
    is $s->stop('TERM'), 0, 'exits 0 on TERM';
};

subtest '.psgi file given by a bare relative name' => sub {
    my $dir = "$TMP/psgi";
    spew( "$dir/thing.psgi", app_with_body(q{'from-psgi-file'}) );
    my $s = start_in( $dir, 'thing.psgi' ) or return fail('server started');
    is get_body($s), 'from-psgi-file', 'relative thing.psgi is loaded as a file from the cwd';
    $s->stop('TERM');
};

subtest 'file returning a provider object: to_app called exactly once' => sub {
    my $count = "$TMP/to_app_calls.txt";
    my $app = write_app( <<"PERL", 'provider.pl' );
use strict; use warnings; use Future::AsyncAwait;
package Test::Provider;
sub new { my (\$c, %a) = \@_; return bless { %a }, \$c }
sub to_app {
    my (\$self) = \@_;
    open my \$fh, '>>', '$count' or die; print \$fh "to_app\\n"; close \$fh;
    my \$label = \$self->{label};
    return async sub {
        my (\$scope, \$receive, \$send) = \@_;
        return if \$scope->{type} eq 'lifespan';
        await \$send->({type => 'http.response.start', status => 200, headers => [['content-type','text/plain']]});
        await \$send->({type => 'http.response.body', body => "provider:\$label", more => 0});
    };
}
package main;
Test::Provider->new(label => 'xyz');
PERL
    my $s = start_in( '/', $app ) or return fail('server started');
    is get_body($s), 'provider:xyz', 'the coderef from to_app serves requests';
    is get_body($s), 'provider:xyz', 'and again';
    my $calls = slurp($count) // '';
    my $n = () = $calls =~ /to_app/g;
    is $n, 1, 'to_app was called exactly once (startup + two requests)';
    $s->stop('TERM');
};

# A lib dir with the modules used by the module / -e / -M forms.
my $LIB = "$TMP/lib";
spew( "$LIB/Test/KVApp.pm", <<'PERL' );
package Test::KVApp;
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
our ($NEW, $TO_APP) = (0, 0);
sub new { my ($class, %args) = @_; $NEW++; return bless { args => \%args }, $class }
sub to_app {
    my ($self) = @_;
    $TO_APP++;
    my $args = $self->{args};
    return async sub {
        my ($scope, $receive, $send) = @_;
        return if $scope->{type} eq 'lifespan';
        my $body = JSON::PP->new->canonical->encode({ args => $args, new_calls => $NEW, to_app_calls => $TO_APP, class => __PACKAGE__ });
        await $send->({type => 'http.response.start', status => 200, headers => [['content-type','application/json']]});
        await $send->({type => 'http.response.body', body => $body, more => 0});
    };
}
1;
PERL
spew( "$LIB/KVPlain.pm", <<'PERL' );
package KVPlain;
use strict; use warnings; use Future::AsyncAwait;
sub new { my ($class, %args) = @_; return bless { %args }, $class }
sub to_app {
    my ($self) = @_;
    my $who = $self->{who} // 'nobody';
    return async sub {
        my ($scope, $receive, $send) = @_;
        return if $scope->{type} eq 'lifespan';
        await $send->({type => 'http.response.start', status => 200, headers => [['content-type','text/plain']]});
        await $send->({type => 'http.response.body', body => "plain:$who", more => 0});
    };
}
1;
PERL
spew( "$LIB/Test/CodeNew.pm", <<'PERL' );
package Test::CodeNew;
use strict; use warnings; use Future::AsyncAwait;
sub new {
    my ($class, %args) = @_;
    my $v = $args{v} // 'none';
    return async sub {
        my ($scope, $receive, $send) = @_;
        return if $scope->{type} eq 'lifespan';
        await $send->({type => 'http.response.start', status => 200, headers => [['content-type','text/plain']]});
        await $send->({type => 'http.response.body', body => "codenew:$v", more => 0});
    };
}
1;
PERL
spew( "$LIB/Test/Helper.pm", <<'PERL' );
package Test::Helper;
use strict; use warnings; use Future::AsyncAwait;
sub app {
    my ($label) = @_;
    return async sub {
        my ($scope, $receive, $send) = @_;
        return if $scope->{type} eq 'lifespan';
        await $send->({type => 'http.response.start', status => 200, headers => [['content-type','text/plain']]});
        await $send->({type => 'http.response.body', body => "helper:$label", more => 0});
    };
}
1;
PERL
spew( "$LIB/Test/Exp.pm", <<'PERL' );
package Test::Exp;
use strict; use warnings; use Future::AsyncAwait;
use Exporter 'import';
our @EXPORT    = ();
our @EXPORT_OK = qw(make_app tag);
sub tag { 'exported-tag' }
sub make_app {
    my ($label) = @_;
    return async sub {
        my ($scope, $receive, $send) = @_;
        return if $scope->{type} eq 'lifespan';
        await $send->({type => 'http.response.start', status => 200, headers => [['content-type','text/plain']]});
        await $send->({type => 'http.response.body', body => "exp:$label", more => 0});
    };
}
1;
PERL
spew( "$LIB/Test/NoNew.pm", <<'PERL' );
package Test::NoNew;
use strict; use warnings;
sub to_app { sub { } }
1;
PERL
spew( "$LIB/Test/Late.pm", <<'PERL' );
package Test::Late;
sub answer { 'late-loaded' }
1;
PERL

subtest 'module name with key=value arguments via -I' => sub {
    my $s = start_in( '/', '-I', $LIB, 'Test::KVApp', 'greeting=hello', 'count=3', 'expr=a=b', 'empty=' )
      or return fail('server started');
    my $got = eval { decode_json( get_body($s) ) } // {};
    is_deeply $got->{args}, { greeting => 'hello', count => '3', expr => 'a=b', empty => '' },
      'new() got the key=value pairs (value split at the first =)';
    is $got->{new_calls},    1, 'new called once';
    is $got->{to_app_calls}, 1, 'to_app called once';
    $s->stop('TERM');
};

subtest 'module name without :: (no such file in cwd) is loaded as a module' => sub {
    my $s = start_in( '/', '--lib', $LIB, 'KVPlain', 'who=alice' ) or return fail('server started');
    is get_body($s), 'plain:alice', 'KVPlain->new(who=>"alice")->to_app';
    $s->stop('TERM');
};

subtest 'module whose new() returns a coderef' => sub {
    my $s = start_in( '/', "-I$LIB", 'Test::CodeNew', 'v=42' ) or return fail('server started');
    is get_body($s), 'codenew:42', 'the coderef returned by new is the app (cuddled -Ilib)';
    $s->stop('TERM');
};

subtest '-e with -M (separate and cuddled)' => sub {
    my $s = start_in( '/', '-I', $LIB, '-M', 'Test::Helper', '-e', 'Test::Helper::app("sep")' )
      or return fail('server started');
    is get_body($s), 'helper:sep', '-M Test::Helper -e ...';
    $s->stop('TERM');
    $s = start_in( '/', "-I$LIB", '-MTest::Helper', '-e', 'Test::Helper::app("cuddled")' )
      or return fail('server started (cuddled)');
    is get_body($s), 'helper:cuddled', '-MTest::Helper -e ...';
    $s->stop('TERM');
};

subtest '-e with -MMod=import,list' => sub {
    my $s = start_in( '/', "-I$LIB", '-MTest::Exp=make_app,tag', '-e', 'make_app(tag())' )
      or return fail('server started');
    is get_body($s), 'exp:exported-tag', 'make_app and tag were imported into main';
    $s->stop('TERM');
};

subtest 'relative -I is made absolute' => sub {
    my $base = "$TMP/relbase";
    spew( "$base/lib/Test/RelMod.pm", "package Test::RelMod; sub v { 'relmod' } 1;\n" );
    spew( "$base/lib/Test/RelLate.pm", "package Test::RelLate; sub v { 'rel-late' } 1;\n" );
    # The app changes directory at load time, then requires a module lazily,
    # which only works if @INC holds the absolute form of "lib".
    my $app = spew( "$base/relapp.pl", app_with_body(<<'PERL') );
do {
    require Test::RelMod;
    chdir '/' or die "chdir: $!";
    require Test::RelLate;
    join '|', Test::RelMod::v(), Test::RelLate::v(), (grep { !ref && m{relbase/lib\z} && m{\A/} } @INC) ? 'abs-in-inc' : 'no-abs'
}
PERL
    my $s = start_in( $base, '-I', 'lib', 'relapp.pl' ) or return fail('server started');
    is get_body($s), 'relmod|rel-late|abs-in-inc', 'modules found via -I lib after a chdir; @INC has the absolute path';
    $s->stop('TERM');
};

subtest '$0 is localised so FindBin finds the app directory, then the server' => sub {
    my $dir = "$TMP/fbapp";
    spew( "$dir/lib/Test/Sibling.pm", "package Test::Sibling; sub v { 'sibling' } 1;\n" );
    spew( "$dir/app.pl", <<'PERL' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP ();
use FindBin;
use lib "$FindBin::Bin/lib";
use Test::Sibling;
my %seen = (bin => $FindBin::Bin, zero => $0, sibling => Test::Sibling::v());
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    await $send->({type => 'http.response.start', status => 200, headers => [['content-type','application/json']]});
    await $send->({type => 'http.response.body', body => JSON::PP->new->canonical->encode({%seen, now => $0}), more => 0});
};
$app;
PERL
    my $real = realpath($dir);
    # Loaded by a path relative to a cwd that is not its directory.
    my $s = start_in( $TMP, 'fbapp/app.pl' ) or return fail('server started');
    my $got = eval { decode_json( get_body($s) ) } // {};
    is $got->{bin}, $real, '$FindBin::Bin is the app file directory';
    is $got->{sibling}, 'sibling', 'use lib "$FindBin::Bin/lib" loaded a sibling module';
    ok defined $got->{zero} && File::Spec->file_name_is_absolute( $got->{zero} ) && $got->{zero} =~ m{fbapp/app\.pl\z},
      '$0 is the absolute path of the app file' or diag "got \$0 = " . ( $got->{zero} // 'undef' );
    is $got->{now}, pagi_bin(), 'once loaded, $0 is the server as invoked (not -e)';
    $s->stop('TERM');
};

subtest 'a slow-loading app: the port is bound only after loading' => sub {
    my $port = free_port();
    my $app = write_app( "select(undef, undef, undef, 1.2);\n" . app_with_body(q{'slow-ok'}), 'slow_ok.pl' );
    my $s = spawn_pagi( {}, '-p', $port, $app );
    $s->{port} = $port;
    my ( $listened_early, $t0 ) = ( 0, time );
    while ( time - $t0 < 0.9 ) {
        $listened_early++ if port_listening($port);
        sleep 0.1;
    }
    is $listened_early, 0, 'nothing listens on the port while the app file is still loading';
    ok $s->wait_output( qr/listening on/, 10 ), 'startup line appears after loading';
    is get_body($s), 'slow-ok', 'then it serves';
    $s->stop('TERM');
};

# ---------------------------------------------------------------------------
# Failure paths
# ---------------------------------------------------------------------------

# Control: a held port makes a *good* app fail with the bind error, so the
# "held port" checks below really tell load-before-bind apart.
{
    my $port = free_port();
    my $hold = IO::Socket::INET->new( Listen => 5, LocalAddr => '127.0.0.1', LocalPort => $port, ReuseAddr => 1 )
      or die "hold: $!";
    my $good = write_app( app_with_body(q{'x'}), 'good_for_bind.pl' );
    my ( $code, $err ) = run_pagi( '-p', $port, $good );
    isnt $code, 0, 'control: a good app on a held port fails';
    like $err, qr/cannot listen on/, 'control: ... with the bind error';
}

sub load_fails {
    my ( $name, $args, $want, %o ) = @_;
    subtest "load failure: $name" => sub {
        local $ENV{PERL5LIB} = $o{perl5lib} if $o{perl5lib};
        my $port = free_port();
        my $t0 = time;
        my ( $code, $err, $out ) = run_pagi( '-p', $port, @$args );
        is $code, 1, 'exits with code 1';
        like $err, $o{prefix} // qr/pagi-rs: cannot load the application:/,
          'stderr says what could not be loaded'
          unless $o{no_prefix_check};
        like $err, $want, "stderr carries Perl's error text";
        unlike $err . $out, qr/listening on/, 'no startup line was printed';
        unlike $err, qr/cannot listen/, 'no bind error';
        ok !port_listening($port), "nothing listening on port $port";
        ok time - $t0 < 10, 'failed promptly';

        # Again with the port held by someone else: the load error (not a bind
        # error) proves the app is loaded before the port is bound.
        my $hold = IO::Socket::INET->new( Listen => 5, LocalAddr => '127.0.0.1', LocalPort => $port, ReuseAddr => 1 );
        if ($hold) {
            my ( $code2, $err2 ) = run_pagi( '-p', $port, @$args );
            is $code2, 1, 'held port: still exit 1';
            like $err2, $want, 'held port: the load error is reported (loaded before binding)';
            unlike $err2, qr/cannot listen/, 'held port: never got as far as binding';
        }
    };
}

my $syntax = write_app( "use strict;\nmy \$x = ;\n sub {\n", 'syntax_error.pl' );
load_fails( 'syntax error', [$syntax], qr/Error loading \Q$syntax\E: .*syntax error at \Q$syntax\E line \d+/s );

my $dies = write_app( "use strict;\ndie \"kaboom-at-load-time\\n\";\nsub {};\n", 'dies.pl' );
load_fails( 'die at load', [$dies], qr/Error loading \Q$dies\E: kaboom-at-load-time/ );

my $missing = "$TMP/no/such/app.pl";
load_fails( 'missing file', [$missing], qr/App file not found: \Q$missing\E/ );

{
    my $base = "$TMP/missrel";
    make_path($base);
    my $abs = "$base/nope.pl";
    my $code;
    # relative name reported as an absolute path
    subtest 'load failure: missing file given relatively reports the absolute path' => sub {
        my $s = spawn_pagi( { cwd => $base }, '-p', free_port(), 'nope.pl' );
        my $t0 = time;
        sleep 0.05 while $s->is_running && time - $t0 < 10;
        is $s->{exit_code}, 1, 'exit 1';
        like $s->output, qr/App file not found: \Q$abs\E/, 'message names /abs/nope.pl';
    };
}

# No app named: the reference runner serves the current directory with
# PAGI-Tools' PAGI::App::Directory (root=.), and says so when it is missing.
load_fails( 'no application, and no PAGI-Tools for the default',
    [], qr/No application given\.  Serving the current directory by default needs PAGI::App::Directory \(PAGI-Tools\), which is not installed/ );

subtest 'no application: PAGI::App::Directory serves the current directory' => sub {
    my $lib = "$TMP/fake-tools";
    spew( "$lib/PAGI/App/Directory.pm", <<'PERL' );
package PAGI::App::Directory;
use strict; use warnings; use Future::AsyncAwait; use Cwd ();
sub new { my ( $class, %args ) = @_; bless {%args}, $class }
sub to_app {
    my ($self) = @_;
    return async sub {
        my ( $scope, $receive, $send ) = @_;
        return if $scope->{type} eq 'lifespan';
        my $body = join ' ', map { "$_=$self->{$_}" } sort keys %$self;
        await $send->({ type => 'http.response.start', status => 200, headers => [] });
        await $send->({ type => 'http.response.body', body => "$body cwd=" . Cwd::getcwd() });
    };
}
1;
PERL
    my $site = "$TMP/site";
    make_path($site);
    my $s = wait_startup( spawn_pagi( { cwd => $site }, '-p', 0, '-I', $lib ) );
    is http_request( $s->port, 'GET', '/' )->{body}, 'root=. cwd=' . realpath($site), 'root=. in the working directory';
    $s->stop('TERM');
    $s = wait_startup( spawn_pagi( { cwd => $site }, '-p', 0, '-I', $lib, 'root=/srv/www', 'show_hidden=1' ) );
    is http_request( $s->port, 'GET', '/' )->{body}, 'root=/srv/www show_hidden=1 cwd=' . realpath($site),
      'key=value arguments reach its constructor';
    $s->stop('TERM');
};

my $hash = write_app( "my \$x = { a => 1 };\n\$x;\n", 'hashref.pl' );
load_fails( 'file returning a hashref', [$hash],
    qr/App file must be a coderef or instantiated application-provider object, got: HASH/ );

my $num = write_app( "42;\n", 'number.pl' );
load_fails( 'file returning 42', [$num], qr/App file must be a coderef or instantiated application-provider object, got: \S+/ );

my $noto = write_app( "package Test::NoToApp; sub new { bless {}, shift } package main; Test::NoToApp->new;\n", 'no_to_app.pl' );
load_fails( 'file returning an object without to_app', [$noto], qr/to_app/ );

load_fails( 'missing module', [ '-I', $LIB, 'Test::Does::Not::Exist', 'a=1' ],
    qr/Cannot find module 'Test::Does::Not::Exist': Can't locate Test\/Does\/Not\/Exist\.pm in \@INC/ );

load_fails( 'module without new', [ '-I', $LIB, 'Test::NoNew' ], qr/Module 'Test::NoNew' does not have a new\(\) method/ );

load_fails( '-e that dies', [ '-e', 'die "inline-boom\n"' ], qr/Error evaluating -e code: inline-boom/ );
load_fails( '-e with a syntax error', [ '-e', 'sub { ' ], qr/Error evaluating -e code: .*Missing right curly/s );
load_fails( '-e returning a non-coderef', [ '-e', '42' ], qr/-e code must be a coderef or instantiated application-provider object/ );
load_fails( '-M of a missing module', [ '-M', 'No::Such::ModX', '-e', 'sub {}' ], qr/Cannot load module No::Such::ModX: Can't locate No\/Such\/ModX\.pm/ );

my $exit0 = write_app( "exit 0;\nsub {};\n", 'exit0.pl' );
load_fails( 'exit 0 at load time', [$exit0], qr/Error loading \Q$exit0\E: exit\(\) called/ );
my $exit3 = write_app( "use strict;\nBEGIN { 1 }\nexit(3);\n", 'exit3.pl' );
load_fails( 'exit 3 at load time', [$exit3], qr/exit\(\) called/ );
load_fails( 'exit in -e code', [ '-e', 'exit 0' ], qr/Error evaluating -e code: exit\(\) called/ );

# Missing runtime dependencies: a fake module in PERL5LIB that fails the way
# a missing one does.
my %deps = (
    'Future::AsyncAwait' => [ 'Future/AsyncAwait.pm', 'libfuture-asyncawait-perl', qr/Future::AsyncAwait/ ],
    'IO::Async'          => [ 'IO/Async/Loop.pm',     'libio-async-perl',          qr/IO::Async(?:::Loop)?/ ],
    'Future::IO'         => [ 'Future/IO.pm',         'libfuture-io-perl',         qr/Future::IO/ ],
);
my $dep_app = write_app( app_with_body(q{'never'}), 'dep_app.pl' );
for my $mod ( sort keys %deps ) {
    my ( $file, $pkg, $name_re ) = @{ $deps{$mod} };
    my $fake = "$TMP/fake-" . ( $mod =~ s/\W+/_/gr );
    spew( "$fake/$file", "die \"Can't locate $file in \\\@INC (you may need to install the $mod module)\\n\";\n" );
    load_fails(
        "missing $mod (fake via PERL5LIB)",
        [$dep_app],
        qr/^pagi-rs: the Perl module $name_re, which pagi-rs needs, is not installed\.\s*\nInstall it with: apt-get install \Q$pkg\E/m,
        perl5lib => $fake,
        # The server's own need, not the app's failure.
        prefix => qr/\A(?!.*cannot load the application)/s,
    );
}

# A die during a slow load: poll the port the whole time it is loading.
subtest 'slow failing load never binds the port' => sub {
    my $port = free_port();
    my $app = write_app( "select(undef, undef, undef, 1.2);\ndie \"slow-load-failure\\n\";\n", 'slow_fail.pl' );
    my $s = spawn_pagi( {}, '-p', $port, $app );
    my ( $seen, $t0 ) = ( 0, time );
    while ( $s->is_running && time - $t0 < 10 ) {
        $seen++ if port_listening($port);
        sleep 0.1;
    }
    is $seen, 0, 'the port was never listening during the load';
    is $s->{exit_code}, 1, 'exit code 1';
    like $s->output, qr/Error loading .*slow-load-failure/, 'error text on stderr';
    unlike $s->output, qr/listening on/, 'no startup line';
};

done_testing;
