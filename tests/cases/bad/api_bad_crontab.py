# expect: not a valid crontab expression
account = {"ak_id": "AKIAEXAMPLE000000001", "ak_secret": "SENTINELakSecret0000000000000000000000000"}
collector_configs = {'regions': ['us-east-1']}
from integration_core__runner import Runner
import integration_aws_ec2__main as main
@DFF.API('AWS-EC2 Collection', fixed_crontab='*/15 * * * mon-xyz')
def run():
    pass
