"""The CloudWatch collector's record of written buckets across many runs:
failures of one call or another, a series a ListMetrics answer leaves out,
options changed between runs. On the fake CloudWatch (tests/fake_cloudwatch.py,
its clock the runs' own), through a proxy that fails chosen calls: every
bucket written once, none left out, and no extra call in steady state."""
import pytest

import integration_aws_cloudwatch__main as cw
import integration_core__runner as core
from conftest import account_of
from fake_cloudwatch import FakeCloudWatch, ec2_estate
from servers import FaultProxy


class Estate:
    """`instances` instances of one metric, a clock, and a proxy that fails
    the GetMetricData calls naming `fail['id']` (or all, `fail['all']`)."""

    def __init__(self, monkeypatch, user, instances=1, period=300):
        self.period = period
        self.now0 = 1_800_000_000 // period * period + 7
        self.clock = {'now': self.now0}
        estate = ec2_estate(instances=instances, metrics=1, region='us-east-1')
        self.fake = FakeCloudWatch(estate, period=period, clock=lambda: self.clock['now']).start()
        self.ids = sorted(s['dimensions']['InstanceId'] for s in estate['us-east-1'])
        self.fail = {'id': None, 'all': False}
        self.proxy = FaultProxy(self.fake.url, lambda r: ('status', 503, 'unavailable') if (
            b'MetricDataQueries' in r['body'] and (self.fail['all'] or (
                self.fail['id'] and self.fail['id'].encode() in r['body']))) else None)
        monkeypatch.setenv('AWS_ENDPOINT_URL_CLOUDWATCH', self.proxy.url)
        self.account = account_of(user)

    def collector(self, now, configs=None):
        configs = dict({'regions': ['us-east-1'], 'period': self.period, 'max_attempts': 1}, **(configs or {}))
        return cw.DataCollector(self.account, configs, now=lambda: now)

    def run(self, now, configs=None, fails=False):
        self.clock['now'] = now
        self.fake.reset()
        try:
            core.Runner(self.collector(now, configs), force=True).run()
        except core.RunFailed:
            if not fails:
                raise
        return sum(1 for c in self.fake.calls if c['operation'] == 'GetMetricData')

    def stop(self):
        self.proxy.stop()
        self.fake.stop()


@pytest.fixture
def estate(monkeypatch, user):
    made = []

    def make(**kwargs):
        made.append(Estate(monkeypatch, user, **kwargs))
        return made[-1]
    yield make
    for one in made:
        one.stop()


def stamps(sink, instance):
    return [p['timestamp'] // 10**9 for p in sink.metrics() if p['tags'].get('InstanceId') == instance]


@pytest.mark.parametrize('period,runs', [(300, 40), (60, 90)])
def test_one_call_or_the_other_failing_every_other_run(estate, sink, period, runs):
    """101 series x 5 statistics: two calls a run; every other run one of
    them fails, which one alternating, for hours."""
    e = estate(instances=101, period=period)
    p, t = e.period, e.now0
    end0 = (t - (600 if p == 300 else 180)) // p * p
    calls = [e.run(t)]
    for k in range(1, runs + 1):
        e.fail['id'] = (e.ids[-1] if k % 4 == 1 else e.ids[0]) if k % 2 else None
        calls.append(e.run(t + k * p, fails=True))
    e.fail['id'] = None
    calls.append(e.run(t + (runs + 1) * p))
    assert max(calls) <= 2 and calls[-1] == 2
    for instance in (e.ids[0], e.ids[50], e.ids[-1]):
        assert sorted(stamps(sink, instance)) == list(range(end0 - 3 * p, end0 + (runs + 1) * p, p))


def test_a_failed_series_a_listmetrics_answer_leaves_out_keeps_its_buckets(estate, sink):
    e = estate(instances=2, period=60)
    p, t = e.period, e.now0
    end0 = (t - 180) // p * p
    x, y = e.ids
    e.run(t)
    e.fail['id'] = x                        # back after 70 minutes: x's call fails
    e.run(t + 70 * p, fails=True)
    e.fail['id'] = None
    collector = e.collector(t + 71 * p)
    cache, key = collector.cache_store(), (f'integration_aws_cloudwatch:series:{collector.record_scope}:'
                                           f"{collector.identity()['account_id']}:us-east-1")
    rows = core.unpack_json(core.cache_get(cache, key))
    cache.set(key, core.pack_json([r for r in rows if r[2][0][1] != x]), expires=3600)
    e.run(t + 71 * p)                       # x left out of this answer
    cache.delete(key)
    e.run(t + 72 * p)                       # x listed again
    e.run(t + 73 * p)
    for instance in (x, y):
        assert sorted(stamps(sink, instance)) == list(range(end0 - 3 * p, end0 + 73 * p, p))


def test_raising_delay_or_adding_a_statistic_writes_no_bucket_twice(estate, sink, caplog):
    e = estate(period=300)
    p, t = e.period, e.now0
    for k in range(4):
        e.run(t + k * p, {'statistics': ['Sum']})
    e.run(t + 4 * p, {'statistics': ['Sum', 'Average'], 'delay': 1800})     # 4 periods more
    e.run(t + 5 * p, {'statistics': ['Sum', 'Average'], 'delay': 1800})
    e.run(t + 9 * p, {'statistics': ['Sum', 'Average'], 'delay': 1800})
    got = stamps(sink, e.ids[0])
    end0 = (t - 600) // p * p
    assert sorted(got) == list(range(end0 - 3 * p, (t + 9 * p - 1800) // p * p, p))
    # The statistic added is in every bucket after the last one written without it.
    first_with_average = (t + 3 * p - 600) // p * p
    assert all(('CPUUtilization_Average' in pt['fields']) == (pt['timestamp'] // 10**9 >= first_with_average)
               for pt in sink.metrics())
    assert not any('ahead of this clock' in r.getMessage() for r in caplog.records)


def series_key(e, now):
    collector = e.collector(now)
    return collector.cache_store(), (f'integration_aws_cloudwatch:series:{collector.record_scope}:'
                                     f"{collector.identity()['account_id']}:us-east-1")


def listed(e, instance, active):
    for series in e.fake._estate('us-east-1').series:
        if series.dimensions.get('InstanceId') == instance:
            series.active = active


def test_a_series_left_out_of_listmetrics_for_a_while_gets_its_buckets_when_back(estate, sink):
    """y has data all along but ListMetrics leaves it out for 40 minutes:
    listed again, it is read back like a new series."""
    e = estate(instances=2, period=60)
    p, t = e.period, e.now0
    end0 = (t - 180) // p * p
    x, y = e.ids
    cache, key = series_key(e, t)
    for k in range(50):
        listed(e, y, not 5 <= k < 45)
        cache.delete(key)                   # a fresh ListMetrics answer each run
        e.run(t + k * p)
    assert sorted(stamps(sink, x)) == list(range(end0 - 3 * p, end0 + 49 * p, p))
    assert sorted(stamps(sink, y)) == list(range(end0 - 17 * p, end0 + 49 * p, p))


def test_a_failed_series_no_longer_listed_costs_no_call_when_no_bucket_closed(estate, sink):
    e = estate(instances=2, period=300)
    p, t = e.period, e.now0
    x, _ = e.ids
    cache, key = series_key(e, t)
    e.run(t)
    e.fail['id'] = x
    e.run(t + p, fails=True)
    e.fail['id'] = None
    listed(e, x, False)
    calls = []
    for m in range(1, 61):                  # an hour, one run a minute
        cache.delete(key)
        calls.append(e.run(t + p + 60 * m))
    # One call a bucket closed (12), and one the first minute, for the bucket
    # the failed run left to y too.
    assert sum(calls) == 13 and set(calls) == {0, 1}, calls
    end0 = (t - 600) // p * p
    assert sorted(stamps(sink, e.ids[1])) == list(range(end0 - 3 * p, (t + p + 3600 - 600) // p * p, p))
