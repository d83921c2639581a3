# expect: collector #1 is a dict, not a collector
account = {"ak_id": "AKIAEXAMPLE000000001", "ak_secret": "SENTINELakSecret0000000000000000000000000"}
collector_configs = {'regions': ['us-east-1']}
from integration_core__runner import Runner
import integration_aws_ec2__main as main
@DFF.API('AWS-EC2 Collection', timeout=3600, fixed_crontab='*/15 * * * *')
def run():
    Runner(account).run()
