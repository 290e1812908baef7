use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;

# The scope's strings that repeat from request to request (type, method,
# HTTP version, scheme, addresses, header names and values, the spec
# versions) share one kept buffer copy-on-write (src/interp/c/interned.c).
# They must stay the application's own strings: changing one changes
# nothing else, and a copy outlives its kept string being pushed out of
# the table, and the table's limit of 255 sharers per buffer.

my $app = write_app( <<'PERL', 'scope_strings.pl' );
use strict; use warnings; use Future::AsyncAwait; use JSON::PP (); use B ();
my @held;      # header pairs of earlier requests, as the scope gave them
my @methods;   # the scope's method strings of earlier requests
sub cow { (B::svref_2object(\$_[0])->FLAGS & B::SVf_IsCOW()) ? 1 : 0 }
my $app = async sub {
    my ($scope, $receive, $send) = @_;
    return if $scope->{type} eq 'lifespan';
    # Asked first: copying a string marks it shared too.
    my %shared = (
        method => cow($scope->{method}),
        type   => cow($scope->{type}),
        name   => cow($scope->{headers}[0][0]),
        value  => cow($scope->{headers}[0][1]),
        pagi   => cow($scope->{pagi}{version}),
    );
    my %d = (
        shared  => \%shared,
        type    => $scope->{type},
        method  => $scope->{method},
        version => $scope->{http_version},
        scheme  => $scope->{scheme},
        server  => $scope->{server}[0],
        pagi    => $scope->{pagi}{version},
        spec    => $scope->{pagi}{spec_version},
        headers => [ map { [@$_] } @{ $scope->{headers} } ],
    );
    if ($scope->{path} eq '/check') {
        # Every pair held since the first request still says what it said.
        my @bad = grep { $_->[0] ne "x-n-$_->[2]" || $_->[1] ne "v-$_->[2]" } @held;
        $d{held} = scalar @held;
        $d{bad}  = scalar @bad;
        $d{methods_bad} = scalar grep { $_ ne 'GET' } @methods;
        $d{methods} = scalar @methods;
    }
    elsif ($scope->{path} =~ m{^/hold/(\d+)}) {
        my ($n) = $1;
        my ($pair) = grep { $_->[0] =~ /^x-n-/ } @{ $scope->{headers} };
        push @held, [ $pair->[0], $pair->[1], $n ];
        push @methods, $scope->{method};
    }
    else {
        # Change every repeated string in place.
        $scope->{type} .= '-changed';
        $scope->{method} =~ tr/A-Z/a-z/;
        substr($scope->{http_version}, 0, 1) = '9';
        $scope->{scheme} .= 's';
        $scope->{server}[0] .= '!';
        $scope->{pagi}{version} .= '.1';
        $scope->{pagi}{spec_version} = 'x';
        $_->[0] = uc $_->[0], $_->[1] .= '?' for @{ $scope->{headers} };
    }
    my $out = JSON::PP->new->canonical->encode(\%d);
    await $send->({type => 'http.response.start', status => 200,
        headers => [['content-type', 'application/json'], ['content-length', length $out]]});
    await $send->({type => 'http.response.body', body => $out});
};
$app;
PERL

my $s    = start_server($app);
my $port = $s->port;


subtest 'a change to one scope string shows in no later scope' => sub {
    my $sock = connect_port($port);
    my @seen = map { ask_json( $sock, '/change', 'Accept: */*' ) } 1 .. 3;
    my $other = ask_json( connect_port($port), '/change', 'Accept: */*' );
    for my $d ( @seen, $other ) {
        is $d->{type},    'http',      'type';
        is $d->{method},  'GET',       'method';
        is $d->{version}, '1.1',       'http_version';
        is $d->{scheme},  'http',      'scheme';
        is $d->{server},  '127.0.0.1', 'server host';
        is $d->{pagi},    '0.5',       'pagi.version';
        is $d->{spec},    '0.6',       'pagi.spec_version';
        is_deeply $d->{headers}, [ [ 'host', '127.0.0.1' ], [ 'accept', '*/*' ] ], 'headers';
    }
};

subtest 'the repeated strings share one buffer' => sub {
    my $d = ask_json( connect_port($port), '/change', 'Accept: */*' );
    is_deeply $d->{shared}, { map { $_ => 1 } qw(method type name value pagi) },
      'method, type, a header name and value, pagi.version are copy-on-write copies'
      or diag explain $d->{shared};
};

subtest 'copies outlive their kept string and the count of sharers' => sub {
    # 600 distinct names and values push each other out of the tables (256
    # slots each), while the app holds every pair it was given; 600 method
    # strings held are more than one buffer's 255 sharers.
    my $sock = connect_port($port);
    for my $n ( 1 .. 600 ) {
        my $d = ask_json( $sock, "/hold/$n", "X-N-$n: v-$n" );
        is_deeply( $d->{headers}[1], [ "x-n-$n", "v-$n" ], "request $n" ) or last if $n % 100 == 0 || !$d->{headers};
    }
    my $d = ask_json( $sock, '/check' );
    is $d->{held}, 600, 'the app held 600 pairs';
    is $d->{bad},  0,   'each still holds its own name and value';
    is $d->{methods},     600, 'and 600 method strings';
    is $d->{methods_bad}, 0,   'each still GET';
};

$s->stop;
done_testing;
