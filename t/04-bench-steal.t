use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/../bench/lib";
use PagiBench qw(cpu_ticks steal_percent with_steal steal_limit clean_ratios alternate_rounds steal_text);

# The bench scripts' record of the host's steal (bench/lib/PagiBench.pm):
# how it reads /proc/stat, which rounds it calls disturbed, and that a
# disturbed round is run again within the allowance.

# A /proc/stat cpu line: user nice system idle iowait irq softirq steal
# guest guest_nice, in ticks.
sub ticks { [@_] }

subtest 'steal is the share of all ticks between two samples' => sub {
    my $before = ticks( 100, 0, 50, 800, 0, 0, 10, 40, 7, 0 );
    my $after  = ticks( 160, 0, 70, 880, 0, 0, 20, 70, 9, 0 );
    # 60 + 20 + 80 + 10 + 30 = 200 ticks, 30 of them stolen; guest (counted
    # in user already) is left out.
    is steal_percent( $before, $after ), 15, '30 of 200 ticks';
    is steal_percent( $before, $before ), undef, 'no ticks passed: unknown';
    is steal_percent( [], $after ), undef, 'no sample: unknown';
    is steal_percent( ticks( 1 .. 7 ), ticks( 2 .. 8 ) ), undef, 'a line without steal: unknown';
};

subtest 'this machine has a cpu line with a steal figure' => sub {
    plan skip_all => 'no /proc/stat' unless -r '/proc/stat';
    my $t = cpu_ticks();
    cmp_ok scalar @$t, '>=', 8, 'eight figures or more';
    my ( $result, $steal ) = with_steal( sub { my $x = 0; $x += $_ for 1 .. 200_000; $x } );
    is $result, 20_000_100_000, 'with_steal returns what the code returned';
    ok !defined $steal || ( $steal >= 0 && $steal <= 100 ), 'a percentage, or unknown';
};

subtest 'a round is disturbed when either measurement passed the limit' => sub {
    local $ENV{BENCH_MAX_STEAL};
    is steal_limit(), 5, 'five per cent unless set';
    my @ratios = ( 0.5, 0.4, 0.6, 0.55 );
    my @steals = ( [ 0, 1 ], [ 7, 0 ], [ undef, 2 ], [ 5, 5 ] );
    is_deeply [ clean_ratios( \@ratios, \@steals ) ], [ 0.5, 0.6, 0.55 ],
      'the round at 7 % is left out; unknown and exactly the limit are kept';
    $ENV{BENCH_MAX_STEAL} = '1.5';
    is steal_limit(), 1.5, 'BENCH_MAX_STEAL sets it';
    is_deeply [ clean_ratios( \@ratios, \@steals ) ], [0.5], 'and moves the line: 2 % is over it';
    $ENV{BENCH_MAX_STEAL} = 'lots';
    is steal_limit(), 5, 'a value that is not a number is ignored';
    is steal_text(undef), '?',     'unknown steal shows as ?';
    is steal_text(2.345), '2.3 %', 'one decimal';
};

# A sampler that serves samples whose difference steals the given percents
# in turn: each measurement takes two samples, 100 ticks apart.
sub fake_sampler {
    my @percents = @_;
    my ( $user, $steal, $calls ) = ( 0, 0, 0 );
    return sub {
        if ( $calls++ % 2 ) {
            my $p = shift @percents // 0;
            $steal += $p;
            $user  += 100 - $p;
        }
        return ticks( $user, 0, 0, 0, 0, 0, 0, $steal );
    };
}

subtest 'disturbed rounds are run again, within the allowance' => sub {
    local $ENV{BENCH_MAX_STEAL};
    my @servers = ( { name => 'base' }, { name => 'pagi' } );
    my $n       = 0;
    my @seen;
    my %args = (
        servers  => \@servers,
        measure  => sub { { rps => ++$n } },
        progress => sub { push @seen, "$_[0]:$_[1]{name}" },
    );

    # Round 2 is disturbed (pagi-rs's run at 20 %): a third round runs.
    my ( $runs, $steals ) = alternate_rounds( %args, rounds => 2, extra => 2,
        sampler => fake_sampler( 0, 1, 0, 20, 3, 0 ) );
    is scalar @$steals, 3, 'three rounds for two undisturbed';
    is_deeply $steals, [ [ 0, 1 ], [ 0, 20 ], [ 3, 0 ] ], 'each round records both steals';
    is_deeply [ map { $_->{rps} } @{ $runs->{pagi} } ], [ 2, 4, 6 ], 'servers measured in turn';
    is $runs->{pagi}[1]{steal}, 20, 'the figures carry their steal';
    is_deeply \@seen, [qw(1:base 1:pagi 2:base 2:pagi 3:base 3:pagi)], 'progress after each';

    # Every round disturbed: it stops at rounds + extra.
    ( $runs, $steals ) = alternate_rounds( %args, rounds => 2, extra => 1,
        sampler => fake_sampler( (50) x 10 ) );
    is scalar @$steals, 3, 'no more than rounds + extra';
    is_deeply [ clean_ratios( [ 1, 1, 1 ], $steals ) ], [], 'and none of them clean';

    # No allowance: exactly the rounds asked for.
    ( $runs, $steals ) = alternate_rounds( %args, rounds => 2, extra => 0,
        sampler => fake_sampler( (50) x 10 ) );
    is scalar @$steals, 2, 'extra 0 runs no more';
};

done_testing;
