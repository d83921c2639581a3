# expect: No module named 'integration_aws_ec3__main'
import integration_aws_ec3__main as main
@DFF.API('AWS-EC2 Collection', timeout=3600, fixed_crontab='*/15 * * * *')
def run():
    pass
