# expect: the script failed while loading: ValueError: SENTINEL is not set (line 6)
account = {"ak_id": "AKIAEXAMPLE000000001", "ak_secret": "SENTINELakSecret0000000000000000000000000"}
collector_configs = {'regions': ['us-east-1']}
from integration_core__runner import Runner
import integration_aws_ec2__main as main
raise ValueError('SENTINEL is not set')
